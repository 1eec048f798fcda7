"""data.document_masking end to end, in one process: the loader's doc_starts reach the model in
training and validation, the loss differs from a run without masking, and a masked run resumes
bitwise. The demo corpus has documents longer than a sample, so these runs use shards of short
documents (the ``short_doc_shards`` fixture)."""

import pytest
from trainer_helpers import EXPERIMENT, base_overrides, in_process_trainer, losses, metrics

from titans_train.config_load import load_config


def fit(data, run, steps, *extra, process_group):
    return in_process_trainer(data, run, steps, *extra, process_group=process_group).fit()


def test_masking_changes_the_loss_and_a_masked_run_resumes_bitwise(
    short_doc_shards, process_group, tmp_path
):
    common = ("checkpoint.interval=2", "train.eval_interval=2", "train.eval_batches=1")
    fit(short_doc_shards, tmp_path / "on", 4, *common, process_group=process_group)
    fit(
        short_doc_shards, tmp_path / "off", 4, *common, "data.document_masking=false",
        process_group=process_group,
    )  # fmt: skip
    on, off = losses(tmp_path / "on"), losses(tmp_path / "off")
    assert on[1] != off[1], "document masking did not change the first step's loss"
    val = [[m["val/loss"] for m in metrics(tmp_path / r) if "val/loss" in m] for r in ("on", "off")]
    assert val[0] and val[0] != val[1], "document masking did not change the validation loss"

    # the same run, stopped at step 2 and resumed: steps 3 and 4 bitwise equal
    fit(short_doc_shards, tmp_path / "resumed", 2, *common, process_group=process_group)
    fit(short_doc_shards, tmp_path / "resumed", 4, *common, process_group=process_group)
    again = losses(tmp_path / "resumed")
    assert [again[s] for s in (3, 4)] == [on[s] for s in (3, 4)]


def test_a_config_saved_before_document_masking_reads_as_without_it(short_doc_shards, tmp_path):
    """A stored config without data.document_masking trained without masking: resuming it with
    the new default is a protected change, named; with masking off there is none."""
    from titans_train.checkpoint import config_diff
    from titans_train.config import public_dict, upgrade_stored

    def cfg(*extra):
        return load_config(EXPERIMENT, base_overrides(short_doc_shards, tmp_path, 2) + list(extra))

    old = public_dict(cfg())
    del old["data"]["document_masking"]  # as an earlier version stored it
    protected, _ = config_diff(upgrade_stored(old), public_dict(cfg()))
    assert protected == ["data.document_masking: False -> True"]
    off = public_dict(cfg("data.document_masking=false"))
    assert config_diff(upgrade_stored(old), off) == ([], [])


@pytest.mark.parametrize("variant", ["mac", "mal"])
def test_documents_train_under_zero3(short_doc_shards, process_group, tmp_path, variant):
    """ZeRO-3 gathers parameters with module hooks: the document paths (MAC's grid, MAL's
    persistent prefix) must use every parameter inside its module's forward. The first step's
    loss equals ZeRO-2's."""
    runs = {}
    for stage in (2, 3):
        run = tmp_path / f"z{stage}"
        fit(short_doc_shards, run, 2, f"zero.stage={stage}", f"model.variant={variant}",
            process_group=process_group)  # fmt: skip
        runs[stage] = losses(run)
    assert runs[3][1] == pytest.approx(runs[2][1], rel=1e-5)
