"""Decode-step forward time of one rank's model at tp1pp1, in-process, for the code it is run from:
the StageModel of revisions before the nn.Module layers, or the nn.Module model after them.
    cd WORKTREE && PYTHONPATH=$PWD /path/to/.venv/bin/python /path/to/scripts/ab_forward.py MODEL_DIR BATCH [CONTEXT [DTYPE]]
Runs decode steps of BATCH sequences at a CONTEXT-token context (default 128; 2 threads) in DTYPE
(default float32; bfloat16 packs the linear weights for oneDNN where the revision and CPU can) and
prints the median step time. Alternate it between two worktrees to compare them, or vary CONTEXT to see
how a decode step grows with the cache it reads."""
import statistics, sys, time, torch
from remp.config import ModelConfig
from remp.kv.cache import KVCache
from remp.topology import Topology
from remp.weights.store import WeightStore
path = sys.argv[1]; B = int(sys.argv[2]); CTX = int(sys.argv[3]) if len(sys.argv) > 3 else 128
DT = getattr(torch, sys.argv[4]) if len(sys.argv) > 4 else torch.float32
STEPS = 40 if CTX <= 512 else 12
torch.set_num_threads(2)
cfg = ModelConfig.from_pretrained(path); hf = cfg.hf_config(); store = WeightStore(path); topo = Topology(1, 1)
try:
    from remp.model.llama import Batch, StageModel
    model = StageModel(cfg, topo, 0, store.shard(cfg, topo, 0, DT), None, hf, torch.device("cpu"))
    fwd = lambda b, kv: model.forward(b, None, kv, lambda: False)
    which = "old"
except ImportError:
    from remp.layers.batch import Batch
    from remp.models.registry import model_class
    from remp.parallel.context import ParallelContext
    from remp.weights.loader import load_weights
    model = model_class(cfg.architecture)(cfg, ParallelContext(topo, 0), hf)
    load_weights(model, store, DT, torch.device("cpu"))
    fwd = lambda b, kv: model(b, None, kv)
    which = "new"
    try:
        from remp.layers.packed import pack_linears, packing_works
        if DT == torch.bfloat16 and packing_works():
            pack_linears(model)
            which = "new, packed"
    except ImportError:
        pass
bs = 16; per = CTX // bs + 1
kv = KVCache(cfg, topo, 0, B * per, bs, DT, torch.device("cpu"))
for blk in range(B * per):
    for layer in kv.layers.values(): layer[blk].zero_()
tables = [list(range(i * per, (i + 1) * per)) for i in range(B)]
def batch():
    pos = [CTX] * B
    slots = [t[CTX // bs] * bs + CTX % bs for t in tables]
    return Batch(input_ids=torch.randint(0, 1000, (B,)), positions=torch.tensor(pos), slots=torch.tensor(slots),
                 block_size=bs, q_lens=[1] * B, starts=pos, block_tables=tables, device=torch.device("cpu"))
times = []
with torch.no_grad():
    for i in range(STEPS):
        b = batch(); t0 = time.perf_counter(); fwd(b, kv); times.append(time.perf_counter() - t0)
print(which, str(DT), f"batch {B} context {CTX}: median {1e3*statistics.median(times[STEPS // 4:]):.2f} ms")
