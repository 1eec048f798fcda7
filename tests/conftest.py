import os

# Set before torch/deepspeed/wandb are imported by any test module.
# CPU tests run on the CPU on a GPU host too: the GPUs are hidden from torch (and from every
# subprocess), so torch and DeepSpeed's accelerator (DS_ACCELERATOR=cpu) agree. Tests meant for a
# GPU run with TITANS_TEST_GPU=1, which keeps the GPUs visible and makes DeepSpeed default to CUDA.
if os.environ.get("TITANS_TEST_GPU") == "1":
    os.environ.setdefault("DS_ACCELERATOR", "cuda")
else:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# One intra-op thread per test process (set it yourself to override): `make test` runs 2 xdist
# workers on 2 cores, and most tests start ranks of their own, so torch's default of one thread
# per core oversubscribes the cores, and every small op's OpenMP join then waits for a
# descheduled thread. tests/test_models.py + test_memory.py on 2 workers, loaded machine,
# alternating: 170 s and 152 s with 2 threads, 54 s and 50 s with 1 (2026-12-01).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Triton's interpreter (the memory kernels' CPU tests) must be on before triton is first
# imported: triton.language decorates its own helpers (tl.sum, ...) at import, and a test that
# runs earlier may import it (torch's flash/flex paths do). Without this, test_memory_triton
# failed after test_attention.py with "Cannot call @triton.jit'd outside of the scope of a kernel".
if os.environ.get("TITANS_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def float64():
    """fp64 as the default dtype for one test (``pytestmark = pytest.mark.usefixtures("float64")``
    in a module): a module-level set_default_dtype would leak into every test collected with it
    (it did: export tests then compared fp64 fresh models with fp32 loads)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """Demo shards (stdlib sources, byte tokenizer, T=128), built once per test session."""
    from trainer_helpers import build_demo

    return build_demo(tmp_path_factory.mktemp("demo") / "shards", seq_len=128)


@pytest.fixture(scope="session")
def short_doc_shards(tmp_path_factory):
    """Shards (T=128, bytes, 10 % val) of 900 random-letter documents of 10-60 bytes: several
    documents per sample, unlike the demo corpus."""
    import json

    import numpy as np
    from data_helpers import LETTERS, build

    root = tmp_path_factory.mktemp("short_docs")
    rng = np.random.default_rng(0)
    docs = [bytes(rng.choice(LETTERS, int(rng.integers(10, 60)))).decode() for _ in range(900)]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    build(str(root / "shards"), [str(corpus)], seq_len=128, samples_per_shard=16, val_fraction=0.1)
    return root / "shards"


@pytest.fixture(scope="session")
def zero_run(demo_shards, tmp_path_factory):
    """zero_run(stage, variant="mac"): the tiny run at one ZeRO stage (2 processes, 20 steps,
    checkpoints at 10 and 20; ZeRO-3 with activation checkpointing), trained once per session on
    first use. The ZeRO-parity, exact-resume, finished-run and export tests share these runs, so
    copy one before changing anything in it."""
    from trainer_helpers import SHARED_STEPS, shared_run_args, train

    runs = {}

    def get(stage: int, variant: str = "mac"):
        if (stage, variant) not in runs:
            run = tmp_path_factory.mktemp(f"zero{stage}-{variant}")
            train(demo_shards, run, SHARED_STEPS, *shared_run_args(stage, variant))
            runs[stage, variant] = run
        return runs[stage, variant]

    return get


@pytest.fixture(scope="session")
def launch_reference(demo_shards, tmp_path_factory):
    """The uninterrupted tiny run the launcher tests compare with: launch/torchrun.sh, one
    node, 2 processes, every checkpoint kept, sample ids recorded."""
    from launch_helpers import torchrun_sh

    run_dir = tmp_path_factory.mktemp("launch-reference")
    torchrun_sh(demo_shards, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real single-node SLURM (tests/slurm_cluster.py), installed with apt when missing,
    stopped with every job at the end of the session."""
    from slurm_cluster import SlurmUnavailable, start

    try:
        cluster = start(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def process_group():
    """A one-process group for the module, made as the trainer makes it (init_distributed);
    yields its DistEnv. The launcher variables are restored afterwards."""
    import torch.distributed as dist
    from trainer_helpers import forget_deepspeed_groups

    from titans_train.distributed import init_distributed

    launch = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    saved = {k: os.environ.get(k) for k in [*launch, "MASTER_PORT"]}
    os.environ.update(launch, MASTER_PORT=str(29400 + os.getpid() % 500))
    yield init_distributed(startup_timeout=60)
    dist.destroy_process_group()
    forget_deepspeed_groups()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# pytest-xdist (`make test` runs `-n 2 --dist loadgroup`): the tests of these files share an
# expensive session fixture, so each group runs on one worker and builds it once; the launcher and
# SLURM tests also share the cluster and fixed ports. (xdist_group marks cannot do this here:
# xdist 3.8 renames items through an attribute pytest 9 no longer reads.)
XDIST_GROUPS = {
    "tests/test_train.py": "zero-runs",
    "tests/test_eval_export.py": "zero-runs",
    "tests/test_crash_consistency.py": "launch",
    "tests/test_launch_slurm.py": "launch",
    "tests/test_launch_torchrun.py": "launch",
    "tests/test_launch_universal.py": "launch",
}
SHARED_FIXTURES = {"zero_run": "zero-runs", "launch_reference": "launch", "slurm": "launch"}


def pytest_collection_modifyitems(config, items):
    """Keeps XDIST_GROUPS true: a test that uses a shared fixture is in that fixture's group."""
    for item in items:
        file = item.nodeid.split("::")[0]
        for name in item.fixturenames:
            group = SHARED_FIXTURES.get(name)
            if group and XDIST_GROUPS.get(file) != group:
                raise pytest.UsageError(
                    f"{item.nodeid} uses the session fixture {name}: add {file} to XDIST_GROUPS "
                    f"in tests/conftest.py as {group!r}"
                )


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup with XDIST_GROUPS: a group's tests go to one worker, others one by one."""
    if config.option.dist != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return XDIST_GROUPS.get(nodeid.split("::")[0], nodeid)

    return FileGroups(config, log)
