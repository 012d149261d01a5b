"""Zero-shot accuracy through lm-evaluation-harness, on the model object a trial holds.

lm-eval runs in-process through its Python API: `HFLM(pretrained=<model object>)` wraps
the very model the trial pruned (structurally shrunk, masked or with a LoRA adapter
attached), on its device and in its dtype, so there is no save and reload, and the number
belongs to exactly the weights the trial reports.

Roles, as for perplexity: the `validation` role (every decision of a trial or a search)
reads a task's validation split when it defines one, the `test` role (reported only) reads
lm-eval's evaluation split (test when the task has one, else validation). Which split was
read is recorded per task. Tasks are loaded (names resolved, datasets read from the local
cache) before any model is, so an unknown task or an uncached dataset costs one line.
"""
from __future__ import annotations

import hashlib
import logging
import statistics
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from raysparse.data.hub import hub_offline_reason
from raysparse.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SHIPPED_TASKS = Path(__file__).resolve().parents[1] / "tasks"  # raysparse's offline task YAMLs

ROLES = ("validation", "test")

INSTALL = "pip install 'raysparse[eval]' (lm-eval>=0.4)"


@dataclass(frozen=True)
class TaskSpec:
    """Which tasks to run and how: the `eval_tasks*` settings of a trial."""

    names: tuple[str, ...]
    path: str | None = None
    limit: int | None = None
    fewshot: int = 0
    batch_size: int = 8

    @classmethod
    def from_config(cls, config: Any) -> "TaskSpec | None":
        names = parse_task_names(config.eval_tasks)
        if not names:
            return None
        return cls(tuple(names), config.eval_tasks_path, config.eval_tasks_limit, config.eval_tasks_fewshot,
                   config.eval_tasks_batch_size)

    @property
    def include_paths(self) -> list[str]:
        return [str(SHIPPED_TASKS)] + ([str(Path(self.path).resolve())] if self.path else [])


def parse_task_names(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [name.strip() for name in items if str(name).strip()]


def lm_eval_version() -> str:
    """The installed lm-eval's version; a one-line error naming the extra when it is absent."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(f"--eval-tasks needs lm-evaluation-harness, which is not installed: {INSTALL}") from None
    return str(getattr(lm_eval, "__version__", "unknown"))


@lru_cache(maxsize=8)
def _task_manager(paths: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=defaults)


def task_manager(spec: TaskSpec):
    """lm-eval's task index: only raysparse's and the user's folders when they hold every task
    (indexing lm-eval's own ~15K tasks takes tens of seconds), else lm-eval's as well."""
    paths = tuple(spec.include_paths)
    local = _task_manager(paths, False)
    if all(name in local.all_tasks for name in spec.names):
        return local
    # A name no YAML of lm-eval's mentions is unknown: say so without the slow index.
    unknown = [name for name in spec.names if name not in local.all_tasks and not _mentioned_by_lm_eval(name)]
    if not unknown:
        manager = _task_manager(paths, True)
        unknown = [name for name in spec.names if name not in manager.all_tasks]
    if unknown:
        where = f"lm-eval's tasks, {SHIPPED_TASKS}" + (f" or {spec.path}" if spec.path else "")
        raise ConfigError(f"unknown lm-eval task(s) {', '.join(unknown)}: not found in {where} "
                          "(see `lm-eval ls tasks`, or give a folder of task YAMLs with --eval-tasks-path)")
    return manager


def _mentioned_by_lm_eval(name: str) -> bool:
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    return any(name in path.read_text(encoding="utf-8", errors="replace") for path in _yaml_files(root))


@lru_cache(maxsize=2)
def _yaml_files(root: Path) -> tuple[Path, ...]:
    return tuple(root.rglob("*.yaml"))


def _dataset_of(manager, name: str) -> str:
    entry = manager.task_index.get(name)
    cfg = getattr(entry, "cfg", None) or {}
    if not cfg and getattr(entry, "yaml_path", None):
        try:
            from lm_eval.utils import load_yaml_config

            cfg = load_yaml_config(str(entry.yaml_path), mode="simple")
        except Exception:  # noqa: BLE001 - only for the message
            cfg = {}
    path, subset = cfg.get("dataset_path"), cfg.get("dataset_name")
    return f"{path}" + (f" ({subset})" if subset else "") if path else "its dataset"


def load_tasks(spec: TaskSpec, role: str) -> dict[str, Any]:
    """The tasks as lm-eval Task objects, reading `role`'s split; one-line errors for what is missing."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    hub_offline_reason()  # an unreachable hub: cached datasets at once, an uncached one refused fast
    manager = task_manager(spec)
    tasks: dict[str, Any] = {}
    for name in spec.names:
        try:
            # load() since lm-eval 0.4.10 (flat dict of tasks); load_task_or_group before (a tree)
            loaded = manager.load([name])["tasks"] if hasattr(manager, "load") else manager.load_task_or_group([name])
        except Exception as exc:  # noqa: BLE001 - a dataset that cannot be read: name it and the fix
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            raise DataError(
                f"lm-eval task {name}: cannot load {_dataset_of(manager, name)} ({first}); offline, download it "
                "once where the hub is reachable (it is then read from the Hugging Face cache), or give a local "
                "task YAML with `dataset_path: json` and `data_files` through --eval-tasks-path") from None
        for task_name, task in _leaf_tasks(loaded).items():
            _set_role(task, role)
            tasks[task_name] = task
    return tasks


def _leaf_tasks(tree: Any) -> dict[str, Any]:
    """Groups flattened to their tasks (a group's mean is our mean over its tasks)."""
    from lm_eval.api.task import Task

    found: dict[str, Any] = {}
    for key, value in (tree.items() if isinstance(tree, dict) else []):
        if isinstance(value, Task):
            found[value.config.task or str(key)] = value
        else:
            found.update(_leaf_tasks(value))
    return found


def _set_role(task: Any, role: str) -> None:
    """lm-eval reads the test split when a task has one: the validation role reads validation instead."""
    config = task.config
    if role == "validation" and config.validation_split is not None:
        config.test_split = None


def split_read(task: Any) -> str:
    config = task.config
    return str(config.test_split if config.test_split is not None else config.validation_split)


def describe_tasks(spec: TaskSpec) -> dict[str, Any]:
    """The protocol record: lm-eval's version and, per task, its version and splits by role.

    Loading the tasks here (before the model) is also the up-front check of names and datasets."""
    version = lm_eval_version()
    validation, test = load_tasks(spec, "validation"), load_tasks(spec, "test")
    return {"lm_eval": version, "limit": spec.limit, "fewshot": spec.fewshot, "batch_size": spec.batch_size,
            "include_path": spec.path,
            "tasks": {name: {"version": (task.config.metadata or {}).get("version"),
                             "validation_split": split_read(task), "test_split": split_read(test[name])}
                      for name, task in validation.items()}}


def tasks_digest(spec: TaskSpec) -> str:
    """The content of the task folders (YAMLs and their Python): a cached dense result is for these tasks."""
    digest = hashlib.sha256()
    for folder in spec.include_paths:
        for path in sorted(Path(folder).rglob("*")):
            if path.suffix in (".yaml", ".yml", ".py") and path.is_file():
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def evaluate_tasks(model: Any, tokenizer: Any, spec: TaskSpec, role: str, device: Any,
                   desc: str = "zero-shot") -> dict[str, Any]:
    """Run the tasks on `model` as it is now; per task acc / acc_norm / stderr, and their mean.

    The model's train/eval mode is restored afterwards (a trial may go on training it), and
    lm-eval is kept from reseeding the global random generators (the trial's draws stay its own).
    Our task manager is passed on: without it lm-eval indexes all of its own tasks on every call.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    started = time.perf_counter()
    tasks = load_tasks(spec, role)
    was_training = model.training
    logger.info("%s: lm-eval on %s (%s split%s)", desc, ", ".join(tasks), role,
                f", first {spec.limit} documents" if spec.limit else "")
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=spec.batch_size,
                  device=str(device))
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks.values()), num_fewshot=spec.fewshot,
                                      limit=spec.limit, task_manager=task_manager(spec), random_seed=None, numpy_random_seed=None,
                                      torch_random_seed=None, log_samples=False, bootstrap_iters=1000)
    finally:
        model.train(was_training)
    results = summarise(out, tasks)
    results.update(role=role, seconds=round(time.perf_counter() - started, 3))
    return results


def summarise(out: dict[str, Any], tasks: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's result dict reduced to what a summary and a search read."""
    per_task: dict[str, Any] = {}
    for name, task in tasks.items():
        metrics = out["results"].get(name, {})
        row: dict[str, Any] = {"split": split_read(task),
                               "documents": (out.get("n-samples", {}).get(name) or {}).get("effective")}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in metrics:
                row[metric] = float(metrics[f"{metric},none"])
                stderr = metrics.get(f"{metric}_stderr,none")
                row[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
        per_task[name] = row
    accs = [row["acc"] for row in per_task.values() if "acc" in row]
    return {"tasks": per_task, "mean_acc": statistics.fmean(accs) if accs else None}


def zeroshot_line(result: dict[str, Any] | None) -> str:
    """One line: mean and each task's accuracy (acc_norm beside it where defined)."""
    if not result:
        return "-"
    parts = [f"mean {_pct(result.get('mean_acc'))}"]
    for name, row in result["tasks"].items():
        norm = f" (norm {_pct(row['acc_norm'])})" if row.get("acc_norm") is not None else ""
        stderr = f" ±{_pct(row['acc_stderr'])}" if row.get("acc_stderr") is not None else ""
        parts.append(f"{name} {_pct(row.get('acc'))}{stderr}{norm}")
    return "  ".join(parts)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
