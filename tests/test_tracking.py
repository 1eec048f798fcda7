"""Tracking with the real wandb in offline mode, read back with wandb's own transaction-log
reader (`wandb leet inspect --json`). Tests that depend on wandb's process-wide state (which
reads WANDB_* env vars once per process) or on `sys.modules` run in a subprocess."""

import json
import sys
from pathlib import Path

import pytest
from wandb_helpers import (
    connection_trap,
    files_under,
    history,
    read_records,
    run_record,
    run_script,
    wandb_home,
)

from titans_train.tracking import (
    REDACTED,
    Tracker,
    TrackingConfig,
    branch_args,
    format_metrics,
    new_run_id,
    resolve_run_settings,
    scrub_secrets,
)

# Everything a developer's shell or CI might set that would change what these tests see.
WANDB_VARS = (
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_NAME",
    "WANDB_TAGS",
    "WANDB_MODE",
    "WANDB_RUN_ID",
    "WANDB_RESUME",
    "WANDB_RESUME_FROM",
    "WANDB_FORK_FROM",
    "WANDB_API_KEY",
)
FAKE_KEY = "local-" + "0123456789abcdef" * 3  # the shape of a W&B API key, but not a real one


@pytest.fixture(autouse=True)
def clean_wandb_env(tmp_path, monkeypatch):
    for name in WANDB_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in wandb_home(tmp_path / "home").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="module", autouse=True)
def stop_wandb_service():
    yield  # the in-process tests start wandb's service once; stop it for later test modules
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


# --- pure helpers -------------------------------------------------------------------------


def test_new_run_id_is_a_wandb_style_id():
    ids = {new_run_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(len(i) == 8 and i.isalnum() and i == i.lower() and i.isascii() for i in ids)


def test_env_precedence():
    default = TrackingConfig()
    assert resolve_run_settings(default, "run-a", {}) == {
        "project": "titans-train",
        "entity": None,
        "name": "run-a",
        "tags": [],
        "mode": "offline",
    }
    env = {
        "WANDB_PROJECT": "p-env",
        "WANDB_ENTITY": "e-env",
        "WANDB_NAME": "n-env",
        "WANDB_TAGS": "x, y,,cfg",
        "WANDB_MODE": "online",
    }
    got = resolve_run_settings(TrackingConfig(tags=["cfg"]), "run-a", env)
    # Unset config fields take the env; tags are the union, config's first, no repeats.
    assert got == {
        "project": "p-env",
        "entity": "e-env",
        "name": "n-env",
        "tags": ["cfg", "x", "y"],
        "mode": "online",  # the config left mode at its default, so WANDB_MODE decides
    }
    explicit = TrackingConfig(project="p", entity="e", name="n")
    got = resolve_run_settings(explicit, "run-a", env)
    assert (got["project"], got["entity"], got["name"]) == ("p", "e", "n")

    def mode(cfg_mode: str, env_mode: str | None) -> str:
        environ = {} if env_mode is None else {"WANDB_MODE": env_mode}
        return resolve_run_settings(TrackingConfig(mode=cfg_mode), "r", environ)["mode"]

    assert mode("offline", "disabled") == "disabled"
    assert mode("offline", "dryrun") == "offline"  # W&B's legacy spelling
    assert mode("online", None) == "online"
    assert mode("online", "offline") == "offline"  # env may always restrict (air-gapped nodes)
    assert mode("online", "disabled") == "disabled"
    assert mode("disabled", "offline") == "disabled"  # but never loosen an explicit config
    assert mode("disabled", "online") == "disabled"
    with pytest.raises(ValueError, match="WANDB_MODE"):
        mode("offline", "shared")
    with pytest.raises(ValueError, match="tracking.mode"):
        mode("onlnie", None)


def test_branch_args():
    assert branch_args(None, None, None) == {}  # new run
    assert branch_args(None, 6, 10) == {}  # a checkpoint without a run id: new run
    assert branch_args("abc", None, 10) == {"resume": "allow"}
    assert branch_args("abc", 6, None) == {"resume": "allow"}  # nothing known to be past 6
    assert branch_args("abc", 6, 6) == {"resume": "allow"}  # saved at the signal: no rewind
    assert branch_args("abc", 6, 10) == {"resume_from": "abc?_step=6"}


def test_scrub_secrets():
    config = {
        "api_key": "k1",
        "wandb": {"apiKey": "k2", "entity": "me"},
        "hub": [{"hf_token": "k3"}, {"HF-TOKEN": "k4"}],
        "db_password": "k5",
        "url": f"https://u:{FAKE_KEY}@example.org",  # the env key's value, under a harmless key
        "model": {"dim": 64, "tokenizer": "bytes"},
        "data": {"eos_token": "<|endoftext|>", "tokens_seen": 10, "max_tokens": 5},
        "git_sha": "0123456789abcdef0123456789abcdef01234567",
    }
    got = scrub_secrets(config, {"WANDB_API_KEY": FAKE_KEY, "HOME": "/home/someone"})
    assert got["api_key"] == got["wandb"]["apiKey"] == got["db_password"] == REDACTED
    assert got["hub"] == [{"hf_token": REDACTED}, {"HF-TOKEN": REDACTED}]
    assert got["url"] == REDACTED
    for keep in ("model", "data", "git_sha"):
        assert got[keep] == config[keep]
    assert got["wandb"]["entity"] == "me"
    assert config["api_key"] == "k1"  # a copy; the caller's dict is untouched


def test_format_metrics():
    line = format_metrics(
        {
            "zeta": 1,
            "train/lr": 3e-4,
            "mfu": 0.41234,
            "train/loss": 2.34567,
            "grad_norm": 0.8,
            "tokens_per_s": 123456.7,
            "tokens": 1_234_567_890,
            "step": 1200,
            "skipped": True,
            "bad": float("nan"),
            "zero": 0.0,
        }
    )
    assert line == (
        "train/loss=2.346 train/lr=3.00e-04 grad_norm=0.8 bad=nan mfu=0.4123 skipped=True "
        "step=1200 tokens=1.23G tokens_per_s=123k zero=0 zeta=1"
    )
    assert format_metrics({"x": 999_950.0}) == "x=1M"
    assert format_metrics({}) == ""


# --- real wandb, offline ------------------------------------------------------------------


def test_offline_run_history_read_back(tmp_path):
    run_dir = tmp_path / "run"
    config = {"model": {"dim": 64}, "optim": {"lr": 3e-4}}
    tracker = Tracker(TrackingConfig(), run_dir=run_dir, run_name="t1", config=config, rank=0)
    assert tracker.mode == "offline"
    assert tracker.run_path.is_dir() and tracker.run_path.parent == run_dir / "wandb"
    for step in (10, 20, 30):
        tracker.log({"loss": 1.0 / step, "lr": 3e-4}, step=step)
    tracker.log({"val/loss": 0.5}, step=30)  # a second call for the same step joins its row
    tracker.summary({"best_val_loss": 0.5})
    tracker.finish()
    tracker.finish()  # idempotent

    records = read_records(tracker.run_path)
    run = run_record(records)
    assert run["run_id"] == tracker.run_id
    assert run["project"] == "titans-train"
    assert run["display_name"] == "t1"
    assert {k: run["config"]["update"][k] for k in config} == config
    rows = history(records)
    assert sorted(rows) == [10, 20, 30]
    for step in (10, 20, 30):
        assert rows[step]["loss"] == pytest.approx(1.0 / step)
        assert rows[step]["lr"] == pytest.approx(3e-4)
    assert rows[30]["val/loss"] == 0.5
    summaries = [r["summary"]["update"] for r in records if r["type"] == "summary"]
    assert any(s.get("best_val_loss") == 0.5 for s in summaries)
    assert [r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"] == [0]


def test_resume_continues_the_same_run(tmp_path):
    run_dir, cfg = tmp_path / "run", TrackingConfig()
    first = Tracker(cfg, run_dir=run_dir, run_name="r", config={}, rank=0)
    for step in range(1, 6):
        first.log({"loss": float(step)}, step=step)
    first.finish()
    # Requeued after a checkpoint at step 5, the last step logged: no rewind needed.
    second = Tracker(cfg, run_dir=run_dir, run_name="r", config={}, rank=0, run_id=first.run_id)
    assert second.run_id == first.run_id and not second.rewound
    for step in range(6, 9):
        second.log({"loss": float(step)}, step=step)
    second.finish()

    assert second.run_path != first.run_path  # each attempt is its own local segment
    one, two = read_records(first.run_path), read_records(second.run_path)
    assert run_record(one)["run_id"] == run_record(two)["run_id"] == first.run_id
    assert run_record(two).get("resume") is True  # `wandb sync` appends it to the run
    assert "branch_point" not in run_record(two)
    assert sorted(history(one)) == [1, 2, 3, 4, 5]
    assert sorted(history(two)) == [6, 7, 8]


def test_resume_after_dying_past_the_checkpoint_rewinds(tmp_path):
    run_dir, cfg = tmp_path / "run", TrackingConfig()
    first = Tracker(cfg, run_dir=run_dir, run_name="r", config={}, rank=0)
    for step in range(1, 11):
        first.log({"loss": float(step)}, step=step)
    first.finish(exit_code=1)  # died at step 10; the newest checkpoint is step 6

    second = Tracker(
        cfg, run_dir=run_dir, run_name="r", config={}, rank=0, run_id=first.run_id, resume_step=6
    )
    assert second.rewound
    for step in range(7, 13):
        second.log({"loss": 100.0 + step}, step=step)
    second.finish()

    one, two = read_records(first.run_path), read_records(second.run_path)
    # The new segment carries the rewind point; `wandb sync` (or online W&B at init) truncates
    # the run's history to step 6 before the new rows, so 7..10 get the new values.
    assert run_record(two)["run_id"] == first.run_id
    assert run_record(two)["branch_point"] == {"run": first.run_id, "metric": "_step", "value": 6}
    rows = history(two)
    assert sorted(rows) == list(range(7, 13))  # 7..10 written again, not dropped
    assert all(rows[step]["loss"] == 100.0 + step for step in rows)
    assert sorted(history(one)) == list(range(1, 11))  # the old segment is left as it was
    # The next requeue (checkpoint 12, nothing logged past it) must not rewind again.
    marker = run_dir / "wandb" / f"titans-last-step-{first.run_id}.json"
    assert json.loads(marker.read_text()) == {"run_id": first.run_id, "last_step": 12}


# --- subprocesses: wandb's process-wide state, sys.modules, the environment ------------------


def test_rank_nonzero_and_disabled_touch_nothing(tmp_path):
    code = """
        import json, sys
        from titans_train.tracking import Tracker, TrackingConfig
        out = {}
        for rank, mode in ((1, "online"), (1, "offline"), (0, "disabled")):
            t = Tracker(TrackingConfig(mode=mode), run_dir=sys.argv[1], run_name="x",
                        config={"a": 1}, rank=rank)
            t.log({"loss": 1.0}, step=1)
            t.summary({"a": 1})
            t.finish()
            t.finish()
            out[f"{rank}/{mode}"] = [t.mode, t.run_path, len(t.run_id)]
        out["wandb imported"] = "wandb" in sys.modules
        print(json.dumps(out))
    """
    home = tmp_path / "home"
    # WANDB_MODE=offline as `make` exports it: an explicit `disabled` config still wins.
    env = dict(wandb_home(home), WANDB_MODE="offline")
    proc = run_script(code, env, str(tmp_path / "run"))
    out = json.loads(proc.stdout)
    assert out.pop("wandb imported") is False
    assert out == {
        "1/online": ["disabled", None, 8],
        "1/offline": ["disabled", None, 8],
        "0/disabled": ["disabled", None, 8],
    }
    assert not (tmp_path / "run").exists()
    assert files_under(home) == []


def test_env_vars_reach_the_run(tmp_path):
    code = """
        import json, os, sys
        from titans_train.tracking import Tracker, TrackingConfig
        t = Tracker(TrackingConfig(tags=["cfg"]), run_dir=sys.argv[1], run_name="trainer-name",
                    config={}, rank=0)
        t.log({"loss": 1.0}, step=1)
        t.finish()
        # Hidden from wandb.init only, then restored for the rest of the process.
        restored = [os.environ["WANDB_RUN_ID"], os.environ["WANDB_RESUME"]]
        print(json.dumps({"id": t.run_id, "mode": t.mode, "path": str(t.run_path),
                          "restored": restored}))
    """
    env = dict(
        wandb_home(tmp_path / "home"),
        WANDB_PROJECT="p-env",
        WANDB_ENTITY="e-env",
        WANDB_NAME="n-env",
        WANDB_TAGS="a,b",
        WANDB_MODE="offline",
        WANDB_RUN_ID="zzzzzzzz",  # the run id belongs to the checkpoint: ignored
        WANDB_RESUME="must",  # would make wandb refuse to start a new run: ignored
    )
    out = json.loads(run_script(code, env, str(tmp_path / "run")).stdout.splitlines()[-1])
    assert out["restored"] == ["zzzzzzzz", "must"]
    run = run_record(read_records(Path(out["path"])))
    assert out["mode"] == "offline"
    assert run["run_id"] == out["id"] != "zzzzzzzz"
    assert (run["project"], run["entity"], run["display_name"]) == ("p-env", "e-env", "n-env")
    assert run["tags"] == ["cfg", "a", "b"]
    assert not run.get("resume")


def test_api_key_never_written_and_offline_opens_no_connection(tmp_path):
    code = """
        import os, sys
        from titans_train.tracking import Tracker, TrackingConfig
        # (The key comes from the env, not argv: wandb records the command line.)
        config = {"api_key": "cfg-secret-111111111", "hub": {"hf_token": "cfg-secret-222222222"},
                  "note": "key is " + os.environ["WANDB_API_KEY"]}
        first = Tracker(TrackingConfig(), run_dir=sys.argv[1], run_name="k", config=config,
                        rank=0)
        for step in range(1, 5):
            first.log({"loss": 1.0}, step=step)
        first.summary({"token": "cfg-secret-333333333"})
        first.finish()
        second = Tracker(TrackingConfig(), run_dir=sys.argv[1], run_name="k", config=config,
                         rank=0, run_id=first.run_id, resume_step=2)  # rewinds
        second.log({"loss": 2.0}, step=3)
        second.finish()
        print(first.run_path)
    """
    home, run_dir = tmp_path / "home", tmp_path / "run"
    with connection_trap() as (proxy, hits):
        env = dict(wandb_home(home), WANDB_API_KEY=FAKE_KEY, WANDB_MODE="offline")
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            env[name] = env[name.lower()] = proxy
        env["NO_PROXY"] = env["no_proxy"] = ""
        proc = run_script(code, env, str(run_dir))
    assert hits == [], f"offline wandb opened {len(hits)} connection(s): {hits}"

    secrets = [FAKE_KEY, "cfg-secret-"]
    written = files_under(run_dir, home)
    assert any(p.suffix == ".wandb" for p in written) and len(written) > 10
    for path in written:
        data = path.read_bytes()
        assert not any(s.encode() in data for s in secrets), f"secret written to {path}"
    assert not any(s in proc.stdout + proc.stderr for s in secrets)

    run = run_record(read_records(Path(proc.stdout.strip().splitlines()[-1])))
    config = run["config"]["update"]
    assert config["api_key"] == config["hub"]["hf_token"] == config["note"] == REDACTED


def test_connection_trap_sees_online_wandb(tmp_path):
    """The control for the test above: online, wandb-core's requests do reach the trap. The
    server is a reserved `.invalid` name behind the local trap, so nothing leaves the host."""
    code = """
        import sys
        from titans_train.tracking import Tracker, TrackingConfig
        try:
            Tracker(TrackingConfig(mode="online"), run_dir=sys.argv[1], run_name="o",
                    config={}, rank=0)
        except Exception as err:
            print("init failed:", type(err).__name__)
    """
    with connection_trap() as (proxy, hits):
        env = dict(
            wandb_home(tmp_path / "home"),
            WANDB_API_KEY=FAKE_KEY,
            WANDB_BASE_URL="http://wandb.invalid",
            WANDB_INIT_TIMEOUT="60",  # the 401 ends init at once; this only bounds a hang
            WANDB_ERROR_REPORTING="false",
        )
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            env[name] = env[name.lower()] = proxy
        env["NO_PROXY"] = env["no_proxy"] = ""
        proc = run_script(code, env, str(tmp_path / "run"))
    assert "init failed" in proc.stdout
    assert hits and all(b"wandb.invalid" in h for h in hits)
