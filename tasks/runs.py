"""The persisted runs as rows people and tools can tell apart, and which run `predict` may use."""

from __future__ import annotations

from pathlib import Path

from tasks.errors import StoreError
from tasks.store import Store


def verdict(results: dict) -> str | None:
    """Why a run's model should not be used without asking for it; None when it may be.

    Models with a least-squares optimum must have converged to it; the network, which has none,
    must have finished without a warning."""
    converged = results.get("converged")
    if converged is False:
        return f"not converged (relative gap {results['gap_to_optimum']:.2e} to the least-squares optimum)"
    # runs recorded before outliers and extrapolation were warned about hold only `warnings`
    warnings = results.get("model_warnings", results.get("warnings"))
    if converged is None and warnings:
        return warnings[0]
    return None


def run_row(manifest: dict) -> dict:
    """One run as a flat row: what `thermocal runs` prints and `runs --json` gives."""
    p, r = {**manifest["parameters"], **manifest.get("effective", {})}, manifest["results"]
    return {
        "run_id": manifest["run_id"],
        "created": manifest["created"],
        "data": manifest["data"]["path"],
        "data_sha256": manifest["data"]["sha256"],
        "model": r["model"].get("spec", "linear"),  # runs recorded before model families were lines
        "strategy": p["strategy"],
        "optimizer": p["optimizer"] if p["strategy"] == "optimizer" else None,
        "normalize": p["normalize"],
        "lr": p["lr"],
        "epochs": r.get("epochs_run", p["epochs"]),
        "val_fraction": p["val_fraction"],
        "train_rows": r.get("train_rows"),
        "train_loss": r["train_loss"],
        "val_loss": r["val_loss"],
        "converged": r.get("converged"),
        "gap_to_optimum": r.get("gap_to_optimum"),
        "usable": verdict(r) is None,
        "reason": verdict(r),
        "calibration": r["calibration"],
        "sensors": r["fleet"]["sensors"] if "fleet" in r else None,  # a fleet's: one calibration per sensor
    }


def _same_file(recorded: str, asked: str) -> bool:
    return Path(recorded) == Path(asked).resolve()


def list_runs(store: Store, data: str | None = None) -> list[dict]:
    """Every run of the store as a row, oldest first; only those of the data file `data` when given."""
    rows = [run_row(m) for m in store.manifests()]
    return [row for row in rows if data is None or _same_file(row["data"], data)]


def _kind_refused(manifest: dict, fleet: bool) -> str | None:
    if fleet and "fleet" not in manifest["results"]:
        return f"run {manifest['run_id']} calibrated one sensor, not a fleet: predict without --sensor"
    if not fleet and "fleet" in manifest["results"]:
        return (f"run {manifest['run_id']} calibrated a fleet of {manifest['results']['fleet']['sensors']} sensors: "
                "give --sensor ID (`thermocal sensors` lists them)")
    return None


def choose_run(store: Store, run_id: str | None, data: str | None, fleet: bool = False) -> tuple[dict, list[str]]:
    """The manifest `predict` uses and what the user should know about it: the run asked for
    (warned about when its model is not usable), or else the latest usable run (of `data` when
    given; noted when the store holds runs of several data files). StoreError, listing the runs
    and what is wrong with each, when there is none. `fleet`: a fleet's run (predict --sensor),
    else a single sensor's."""
    if run_id is not None:
        manifest = store.manifest(run_id)
        if data is not None and not _same_file(manifest["data"]["path"], data):
            raise StoreError(f"run {run_id} was trained on {manifest['data']['path']}, not {Path(data).resolve()}")
        if _kind_refused(manifest, fleet):
            raise StoreError(_kind_refused(manifest, fleet))
        reason = verdict(manifest["results"])
        return manifest, [] if reason is None else [f"run {run_id} is used as asked, but its model should not be trusted: {reason}"]
    everything = [m for m in store.manifests() if not _kind_refused(m, fleet)]
    manifests = [m for m in everything if data is None or _same_file(m["data"]["path"], data)]
    usable = [m for m in manifests if verdict(m["results"]) is None]
    if usable:
        chosen, files, notes = usable[-1], {m["data"]["path"] for m in everything}, []
        if manifests[-1] is not chosen:
            notes.append(f"the latest run {manifests[-1]['run_id']} is not used: {verdict(manifests[-1]['results'])}")
        if data is None and len(files) > 1:
            notes.append(f"run {chosen['run_id']} calibrates {chosen['data']['path']}; the store holds runs of {len(files)} "
                         "data files (`thermocal runs` lists them): --data PATH chooses one")
        return chosen, notes
    scope = f" of {Path(data).resolve()}" if data is not None else ""
    if not manifests:
        other = [m for m in store.manifests() if _kind_refused(m, fleet) and (data is None or _same_file(m["data"]["path"], data))]
        if other:  # runs of the other kind only: say how to use them
            raise StoreError(_kind_refused(other[-1], fleet))
        missing = " (no such file)" if data is not None and not Path(data).exists() else ""
        kind = " of a fleet" if fleet else ""
        raise StoreError(f"no runs{kind}{scope}{missing} in {store.root}; run `thermocal run{' --data ' + data if data else ''}"
                         f"{' --sensor-column COLUMN' if fleet else ''}` first")
    listed = "\n".join(f"  {m['run_id']} ({m['results']['model'].get('spec', 'linear')}): {verdict(m['results'])}" for m in manifests[-10:])
    raise StoreError(
        f"no run{scope} in {store.root} has a model to trust; the latest runs:\n{listed}\n"
        "train one that converges (`thermocal run`, the error above says what to change), or name one with --run ID to use it anyway"
    )


def single_sensor_id(data: str) -> str:
    """A single-sensor run's sensor, for drift and its events: the data file's name without suffix."""
    return Path(data).stem


def is_fleet(manifest: dict) -> bool:
    return "fleet" in manifest.get("results", {})


def baseline_manifest(store: Store, data: str, baseline: str | None, current: str) -> dict | None:
    """The run to compare with: `baseline` when given (any data file), else the latest earlier run
    of the same data file in the store; None when there is none."""
    if baseline is not None:
        return store.manifest(baseline)
    earlier = [m for m in store.manifests() if m["run_id"] != current and Path(m["data"]["path"]) == Path(data)]
    return earlier[-1] if earlier else None


def calibrations_of(store: Store, manifest: dict) -> dict[str, dict]:
    """A run's calibrations as {sensor: Calibration record}: a fleet's every calibrated sensor, a
    single run's one (named by its data file)."""
    stages = manifest["stages"]
    if is_fleet(manifest):
        report = {"stage": "fleet-report", **stages["report"]}
        return store.load(store.file_ref(report, "calibrations.joblib"))
    trained = store.load({"stage": "train", **stages["train"]})
    return {single_sensor_id(manifest["data"]["path"]): trained["model"]}
