"""Which prompt each evaluation input gets: a model's saved prompts by task type, explicit prompts on top.

``codiemb-st train`` saves the instructions it trained with as the model's sentence-transformers prompts
(``config_sentence_transformers.json`` "prompts") under three agreed names:

- ``"query"``: the IR query instruction, put on the **queries of retrieval tasks**;
- ``"document"``: the IR passage instruction (often ``""``), put on the **documents of retrieval tasks**
  (``"passage"`` or ``"corpus"`` stand in for it when ``"document"`` is absent, in sentence-transformers'
  ``encode_document`` order);
- ``"sts"``: the STS instruction, put on **both sentences of STS tasks**.

Left to itself, mteb would apply ``"query"``/``"document"`` to every task that has queries and documents and drop
``"sts"`` ("task name sts is not valid"), and sentence-transformers' ``encode_query``/``encode_document`` fall back to
the saved ``"query"``/``"document"`` whenever mteb passes no prompt. So :func:`plan_prompts` spells out one prompt for
every input of every task (``""`` where none applies) and :func:`~codiemb_st.evaluation.evaluate_model` hands mteb
exactly that dictionary: no saved prompt reaches a task except by the rule above, and the plan says which saved names
were applied where and which were ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from codiemb_st.evaluation.tasks import PreparedTask

#: The saved prompt names evaluation applies, and the inputs each lands on.
SAVED_PROMPT_TARGETS: dict[str, str] = {
    "query": "retrieval queries",
    "document": "retrieval documents",
    "sts": "STS sentences (both)",
}
#: Names that stand in for ``"document"`` when it is absent (sentence-transformers' ``encode_document`` order).
DOCUMENT_PROMPT_NAMES: tuple[str, ...] = ("document", "passage", "corpus")

# The inputs of a task of each type, and the mteb prompt key of each: mteb looks a prompt up by
# "<Task>-<prompt type>" first, then "<Task>" (STS sentences are encoded with no prompt type).
_ROLES: dict[str, tuple[str, ...]] = {"retrieval": ("query", "document"), "sts": ("sentences",)}
_OTHER_ROLES = ("query", "document", "sentences")
_SOURCE_NONE = "none"
_SOURCE_EXPLICIT = "explicit"


def _mteb_key(task_name: str, role: str) -> str:
    return task_name if role == "sentences" else f"{task_name}-{role}"


@dataclass(frozen=True)
class PromptPlan:
    """The prompt of every input of every task, and what became of the model's saved prompts.

    Args:
        mteb_prompts: The complete mteb prompt dictionary (``"<Task>-query"``, ``"<Task>-document"``, ``"<Task>"``;
            ``""`` where no prompt applies), handed to mteb's encoder as it is.
        tasks: Per task, per input (``"query"``/``"document"`` for retrieval, ``"sentences"`` for STS):
            ``{"prompt": text, "source": "saved:<name>" | "explicit" | "none"}``.
        saved: The model's saved prompts as found (``None`` values dropped).
        use_saved: Whether saved prompts were applied at all.
        applied: Saved name -> the tasks it was applied to.
        overridden: Saved name -> the tasks where an explicit prompt replaced it.
        unused: Saved name -> why it reached no task (no task of its type, or ``"document"`` present).
        ignored: Saved names evaluation does not apply (not one of :data:`SAVED_PROMPT_TARGETS` or their stand-ins).
    """

    mteb_prompts: dict[str, str]
    tasks: dict[str, dict[str, dict[str, str]]]
    saved: dict[str, str]
    use_saved: bool = True
    applied: dict[str, list[str]] = field(default_factory=dict)
    overridden: dict[str, list[str]] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    def task_prompts(self, task_name: str) -> dict[str, str]:
        """The non-empty mteb prompts that reach one task (its entries of :attr:`mteb_prompts`)."""
        keys = (task_name, f"{task_name}-query", f"{task_name}-document")
        return {key: self.mteb_prompts[key] for key in keys if self.mteb_prompts.get(key)}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (``run.json`` keeps one per model)."""
        return {
            "saved": dict(self.saved),
            "use_saved": self.use_saved,
            "applied": {name: list(tasks) for name, tasks in self.applied.items()},
            "overridden": {name: list(tasks) for name, tasks in self.overridden.items()},
            "unused": dict(self.unused),
            "ignored": list(self.ignored),
            "tasks": {
                name: {role: dict(entry) for role, entry in roles.items()} for name, roles in self.tasks.items()
            },
        }

    def describe(self, explicit: str = "explicit prompts", disabled_by: str = "saved prompts disabled") -> str:
        """One line for the log: which saved prompts were applied to which inputs, which were replaced or ignored.

        Args:
            explicit: What the explicit prompts were (e.g. ``"--instructions zh"``), for the message.
            disabled_by: Why saved prompts were not applied (e.g. ``"--no-saved-prompts"``), for the message.
        """
        if not self.saved:
            parts = ["no saved prompts"]
        elif not self.use_saved:
            parts = [f"saved prompts {_names(self.saved)} not applied ({disabled_by})"]
        else:
            parts = []
            for name, tasks in self.applied.items():
                target = SAVED_PROMPT_TARGETS["document" if name in DOCUMENT_PROMPT_NAMES else name]
                parts.append(f"{name}={self.saved[name]!r} on {target} ({', '.join(tasks)})")
            for name, tasks in self.overridden.items():
                parts.append(f"{name} replaced by {explicit} on {', '.join(tasks)} (an explicit choice wins)")
            for name, reason in self.unused.items():
                parts.append(f"{name} unused ({reason})")
            if self.ignored:
                parts.append(
                    f"ignored {_names(self.ignored)} (evaluation applies only {', '.join(map(repr, SAVED_PROMPT_TARGETS))})"
                )
        explicit_tasks = [
            name for name, roles in self.tasks.items() if any(e["source"] == _SOURCE_EXPLICIT for e in roles.values())
        ]
        if explicit_tasks:
            parts.append(f"{explicit} on {', '.join(explicit_tasks)}")
        return "; ".join(parts) or "no saved prompt applies"


def _names(names: Mapping[str, Any] | Sequence[str]) -> str:
    return ", ".join(repr(name) for name in names)


def _explicit_prompt(overrides: Mapping[str, str], task: PreparedTask, role: str) -> str | None:
    """The explicit prompt of one input, looked up as mteb would (task + type, task, task type + type, ...)."""
    if not overrides:
        return None
    from mteb.models.abs_encoder import get_prompt_name
    from mteb.types import PromptType

    prompt_type = None if role == "sentences" else PromptType(role)
    name = get_prompt_name(dict(overrides), task.task.metadata, prompt_type)
    return None if name is None else overrides[name]


def plan_prompts(
    tasks: Sequence[PreparedTask],
    saved: Mapping[str, str | None] | None = None,
    *,
    overrides: Mapping[str, str] | None = None,
    use_saved: bool = True,
) -> PromptPlan:
    """The prompt of every input of every task: explicit prompts first, then the model's saved ones by task type.

    Retrieval queries get the saved ``"query"`` prompt, retrieval documents the saved ``"document"`` (or
    ``"passage"``/``"corpus"``), both STS sentences the saved ``"sts"``; inputs of other task types get none. An
    explicit prompt (``overrides``, in mteb's key format, e.g. :func:`~codiemb_st.evaluation.instruction_prompts`)
    wins over the saved one for every input mteb's lookup gives it to.

    Args:
        tasks: The tasks to be evaluated.
        saved: The model's saved prompts (``model.prompts``); ``None`` values count as absent.
        overrides: Explicit mteb prompts (``{"<Task>-query": ..., "<Task>": ..., "query": ...}``).
        use_saved: ``False`` applies no saved prompt (only the explicit ones).

    Returns:
        The :class:`PromptPlan`.

    Example:
        ::

            plan = plan_prompts(tasks, {"query": "q: ", "sts": "s: ", "classification": "c: "})
            plan.mteb_prompts  # {"SciFact-query": "q: ", "SciFact-document": "", "STSBenchmark": "s: ", ...}
            plan.ignored       # ["classification"]
    """
    saved_prompts = {name: text for name, text in (saved or {}).items() if text is not None}
    document_name = next((name for name in DOCUMENT_PROMPT_NAMES if name in saved_prompts), None)
    by_role = {"query": "query", "document": document_name, "sentences": "sts"}
    mteb_prompts: dict[str, str] = {}
    records: dict[str, dict[str, dict[str, str]]] = {}
    applied: dict[str, list[str]] = {}
    overridden: dict[str, list[str]] = {}
    for task in tasks:
        roles = _ROLES.get(task.type)
        record: dict[str, dict[str, str]] = {}
        for role in roles or _OTHER_ROLES:
            explicit = _explicit_prompt(overrides or {}, task, role)
            name = by_role[role] if roles else None
            has_saved = use_saved and name is not None and name in saved_prompts
            if explicit is not None:
                text, source = explicit, _SOURCE_EXPLICIT
                if has_saved:
                    overridden.setdefault(name, []).append(task.name)
            elif has_saved:
                text, source = saved_prompts[name], f"saved:{name}"
                applied.setdefault(name, []).append(task.name)
            else:
                text, source = "", _SOURCE_NONE
            # "" is explicit too: without an entry, sentence-transformers' encode_query/encode_document would fall
            # back to the saved "query"/"document" prompt on their own.
            mteb_prompts[_mteb_key(task.name, role)] = text
            if roles:
                record[role] = {"prompt": text, "source": source}
        records[task.name] = record
    types = {task.type for task in tasks}
    unused: dict[str, str] = {}
    ignored: list[str] = []
    if use_saved:
        for name in saved_prompts:
            if name in applied or name in overridden:
                continue
            if name in ("query", "sts") or name == document_name:
                kind = "sts" if name == "sts" else "retrieval"
                if kind not in types:
                    unused[name] = f"no {'STS' if kind == 'sts' else 'retrieval'} task"
            elif name in DOCUMENT_PROMPT_NAMES:
                unused[name] = f"{document_name!r} is used for documents"
            else:
                ignored.append(name)
    return PromptPlan(
        mteb_prompts=mteb_prompts,
        tasks=records,
        saved=saved_prompts,
        use_saved=use_saved,
        applied=applied,
        overridden=overridden,
        unused=unused,
        ignored=ignored,
    )


__all__ = ["DOCUMENT_PROMPT_NAMES", "SAVED_PROMPT_TARGETS", "PromptPlan", "plan_prompts"]
