"""The coordinator's live run page, in a real headless browser, while two peers train."""

import re
import subprocess
import threading
import time

import pytest
from _browser import chromium, dump_dom
from test_peer import RECIPE, _Peer

zmq_transport = pytest.importorskip("lowcomm.comm.zmq")


def _syncs(dom: str) -> int:
    m = re.search(r'data-key="syncs committed"><b>(\d+)</b>', dom)
    assert m, dom[-3000:]
    return int(m.group(1))


def test_live_page_shows_members_and_growing_syncs(tmp_path, request):
    browser = chromium(request)
    import json as _json

    corpus = tmp_path / "text.txt"
    corpus.write_bytes(open(_json.__file__, "rb").read() * 3 + open(subprocess.__file__, "rb").read())
    recipe = tmp_path / "recipe.py"
    recipe.write_text(RECIPE.format(steps=5000, data=str(corpus)))
    coord = zmq_transport.Coordinator("tcp://127.0.0.1:*", min_peers=2, heartbeat=0.5, heartbeat_timeout=30,
                                       barrier_timeout=60, recovery=0, dashboard="127.0.0.1:0")
    assert coord.page.server.loopback
    serve = threading.Thread(target=coord.serve, daemon=True)
    serve.start()
    peers = []
    try:
        peers = [_Peer(coord.endpoint, str(recipe), str(tmp_path / f"p{i}")) for i in range(2)]
        peers[0].wait_for("step 10/5000", timeout=120)
        first = dump_dom(browser, coord.page.url)
        # The browser can take long to start on a busy machine: wait for more syncs by the coordinator's
        # own count (not by a step number the peers may have passed already), then look again.
        end = time.monotonic() + 120
        while coord.ops_committed < _syncs(first) + 3 and time.monotonic() < end:
            assert all(p.proc.poll() is None for p in peers), "".join(peers[0].lines[-40:])
            time.sleep(0.2)
        second = dump_dom(browser, coord.page.url)
        for dom in (first, second):
            members = re.findall(r'<tr data-row="(routing token [0-9a-f]+)"', dom.split('id="members"', 1)[1])
            assert len(set(members)) == 2, dom[-3000:]
            assert "tcp://" not in dom  # addresses only with --dashboard-addresses
        assert 0 < _syncs(first) < _syncs(second)
        assert 'id="chart-throughput"' in second and "<polyline" in second
    finally:
        for p in peers:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait(timeout=10)
        coord.stop()
        serve.join(10)
