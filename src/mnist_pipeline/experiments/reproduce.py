"""Run a recorded training again, exactly as recorded, and say whether it came out the same.

    python -m mnist_pipeline.reproduce <run_id> [--output DIR]

Uses the run's recorded config (``config.json``) and checks before any work that the code and
data are the ones the run used: the working tree must be at the recorded commit without
changes, and the processed data must have the recorded content hash. Software versions that
differ are reported as warnings (results may then differ in the last bits). The new run is
logged with the tag ``reproduces=<run_id>``; the command exits 0 when metrics and weights
are identical, 1 when anything differs or the run cannot be reproduced.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mnist_pipeline import tracking
from mnist_pipeline.core import log_filter
from mnist_pipeline.core.config import load_config
from mnist_pipeline.core.errors import PipelineError, exit_on_error
from mnist_pipeline.stages import artifacts
from mnist_pipeline.stages.runner import ensure_processed, run_pipeline
from mnist_pipeline.tracking.provenance import (
    CONFIG_ARTIFACT,
    git,
    uncommitted_changes,
    version_warnings,
)

log = logging.getLogger(__name__)


def check_code(tags: dict[str, str]) -> None:
    """Refuse unless the working tree holds exactly the recorded commit."""
    commit = tags.get("git.commit", "unknown")
    if commit == "unknown":
        why = tags.get("git.error")
        raise PipelineError(
            "the run recorded no git commit, so its code cannot be recovered"
            + (f" (when it ran: {why})" if why else "")
        )
    if git("cat-file", "-e", f"{commit}^{{commit}}") is None:
        raise PipelineError(f"commit {commit} is not in this repository (fetch it first)")
    head = git("rev-parse", "HEAD")
    dirty = bool(uncommitted_changes())
    if head != commit or dirty:
        state = (
            f"{head[:12] if head else 'no commit'}{' with uncommitted changes' if dirty else ''}"
        )
        raise PipelineError(
            f"the run was made by commit {commit[:12]}; the working tree is at {state}. "
            f"Run `git switch --detach {commit[:12]}` (with a clean tree) and try again"
        )
    if tags.get("git.dirty") == "true":
        log.warning(
            "the original run was made from a tree with uncommitted changes, which "
            "were not recorded: the result may differ"
        )


def reproduce(run_id: str, output_dir: Path) -> dict:
    """Re-run ``run_id``; return {"identical": bool, "differences": [...], "run_id": new id}."""
    original = tracking.get_run(run_id)
    tags = original.data.tags
    if tags.get("stage") != "train":
        raise PipelineError(
            f"run {run_id} is a {tags.get('stage', 'non-pipeline')} run; "
            "give the id of a training run"
        )
    if "model_uri" not in tags or "uv.lock.sha256" not in tags:
        raise PipelineError(
            f"run {run_id} predates the records reproduction needs "
            "(config.json, model_uri); re-run it with this version first"
        )
    check_code(tags)
    for warning in version_warnings(tags):
        log.warning("version mismatch: %s", warning)
    cfg = load_config(tracking.load_run_dict(run_id, CONFIG_ARTIFACT))
    available = artifacts.recompute_hash(ensure_processed(cfg).paths.processed)
    if available != tags.get("data.content_sha256"):
        raise PipelineError(
            f"the data available now (hash {available[:12]}) is not the data the run used "
            f"(hash {tags.get('data.content_sha256', 'unrecorded')[:12]}); restore it with "
            "`dvc checkout` at the run's commit"
        )

    name = f"reproduce {original.info.run_name or run_id}"
    job = tracking.JobContext(tags={"reproduces": run_id, "pipeline_run": name})
    result = run_pipeline(cfg, output_dir, job=job)
    new_run = artifacts.read_run_ref(output_dir / "models")["run_id"]
    new = tracking.get_run(new_run)
    differences = [
        f"{key}: {original.data.metrics[key]!r} then, {new.data.metrics[key]!r} now"
        for key in artifacts.HEADLINE_METRICS
        if key in original.data.metrics and original.data.metrics[key] != new.data.metrics.get(key)
    ]
    old_weights = tracking.load_logged_model(tags["model_uri"]).get_weights()
    new_weights = tracking.load_logged_model(new.data.tags["model_uri"]).get_weights()
    if len(old_weights) != len(new_weights) or any(
        not np.array_equal(a, b) for a, b in zip(old_weights, new_weights, strict=False)
    ):
        differences.append("model weights differ")
    identical = not differences
    tracking.set_run_tags(new_run, {"reproduce.identical": str(identical).lower()})
    return {
        "identical": identical,
        "differences": differences,
        "run_id": new_run,
        "metrics": result,
    }


@contextmanager
def _output_folder(given: Path | None, run_id: str) -> Iterator[Path]:
    """``given``, or a temporary folder that is removed again when the reproduction fails: it
    then holds nothing worth keeping, and a failed command leaves no trace."""
    if given is not None:
        yield given
        return
    folder = Path(tempfile.mkdtemp(prefix=f"reproduce-{run_id[:8]}-"))
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_pipeline.reproduce", description=__doc__.splitlines()[0]
    )
    parser.add_argument("run_id")
    parser.add_argument("--output", type=Path, help="folder for the new model and reports")
    args = parser.parse_args(argv)
    log_filter.quiet_command()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with exit_on_error(prefix=f"cannot reproduce {args.run_id}: ", store=tracking.store_label):
        tracking.require_existing_store()
        with _output_folder(args.output, args.run_id) as output:
            report = reproduce(args.run_id, output)
    if report["identical"]:
        print(
            f"identical: run {report['run_id']} reproduces {args.run_id} bit for bit "
            "(metrics and weights)"
        )
        return 0
    print(f"different: run {report['run_id']} does not reproduce {args.run_id}:")
    for line in report["differences"]:
        print(f"  {line}")
    return 1
