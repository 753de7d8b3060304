import time, os
from tests.test_hub import *
from tests.test_hub import hub  # fixture

def test_dbg(hub):
    repo_id = "user/r"
    a, b = tiny_model(seed=0, ffn_type="polyglu"), tiny_model(seed=1, ffn_type="polyglu")
    t=time.time(); first = a.push_to_hub(repo_id); print("push1", time.time()-t)
    t=time.time(); second = b.push_to_hub(repo_id); print("push2", time.time()-t)
    n=len(hub.requests)
    t=time.time(); load_in_fresh_process(repo_id, INPUT_IDS, revision=first.oid, env=dict(os.environ)); print("load1", time.time()-t)
    for r in hub.requests[n:]: print(r)
    n=len(hub.requests)
    t=time.time(); load_in_fresh_process(repo_id, INPUT_IDS, revision="main", env=dict(os.environ)); print("load2", time.time()-t)
    for r in hub.requests[n:]: print(r)
