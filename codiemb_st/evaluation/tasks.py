"""The 15 C-MTEB benchmarks of the CoDiEmb paper and their official task instructions.

The paper (arXiv 2508.11442) reports 8 retrieval tasks (nDCG@10 on ``dev``) and 7 STS tasks (cosine Spearman). The
instructions are the ones the authors' released evaluation script prepends to the inputs
(TencentCloudADP/youtu-embedding, ``training/CoDiEmb/test/eval_cmteb.py``, commit 53f3c68b, dicts
``task2instruction`` and ``task2eninstruction``): retrieval queries get the instruction and passages get none; both
sentences of an STS pair get it. The official prefix is ``"Instruction: {instruction} Query: "``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from codiemb_st.evaluation.corpus_subsample import CorpusSubsample, subsample_task_corpus
from codiemb_st.evaluation.local_data import LocalTaskInfo, find_local_tasks, load_local_task
from codiemb_st.validation import check_positive_int

if TYPE_CHECKING:
    from mteb.abstasks import AbsTask

logger = logging.getLogger(__name__)

TaskKind = Literal["retrieval", "sts"]

#: The prefix the official evaluation builds around an instruction (``build_instruction_prefix`` in eval_cmteb.py).
OFFICIAL_INSTRUCTION_TEMPLATE = "Instruction: {instruction} Query: "


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark of the paper: its mteb name, kind, evaluation split, main metric and instructions.

    Args:
        name: The exact mteb task name.
        type: ``"retrieval"`` or ``"sts"``.
        split: The split the paper evaluates on.
        main_score: The mteb metric the paper reports (``ndcg_at_10`` or ``cosine_spearman``).
        instruction: The official Chinese instruction.
        instruction_en: The official English instruction (``task2eninstruction``).
    """

    name: str
    type: TaskKind
    split: str
    main_score: str
    instruction: str
    instruction_en: str


def _retrieval(name: str, instruction: str, instruction_en: str) -> TaskSpec:
    return TaskSpec(name, "retrieval", "dev", "ndcg_at_10", instruction, instruction_en)


def _sts(name: str, split: str, instruction: str, instruction_en: str) -> TaskSpec:
    return TaskSpec(name, "sts", split, "cosine_spearman", instruction, instruction_en)


#: The 15 C-MTEB tasks of the paper, retrieval first, in the paper's order.
CMTEB_TASKS: tuple[TaskSpec, ...] = (
    _retrieval(
        "CmedqaRetrieval",
        "为医学问题生成表示，用于匹配相关医学文本",
        "Given a Chinese community medical question, retrieve replies that best answer the question",
    ),
    _retrieval(
        "CovidRetrieval",
        "为新冠疫情相关问题生成表示，用于匹配相关文本",
        "Given a question on COVID-19, retrieve news articles that answer the question",
    ),
    _retrieval(
        "DuRetrieval",
        "为用户日常搜索问题生成表示，用于匹配网页内容",
        "Given a Chinese search query, retrieve web passages that answer the question",
    ),
    _retrieval(
        "EcomRetrieval",
        "为用户购物搜索问题生成表示，用于匹配商品属性文本",
        "Given a user query from an e-commerce website, retrieve description sentences of relevant products",
    ),
    _retrieval(
        "MedicalRetrieval",
        "为患者症状描述文本生成表示，用于匹配诊疗方案或医学指南",
        "Given a medical question, retrieve user replies that best answer the question",
    ),
    _retrieval(
        "MMarcoRetrieval",
        "为简短搜索问题生成表示，用于匹配相关长文本网页内容",
        "Given a web search query, retrieve relevant passages that answer the query",
    ),
    _retrieval(
        "T2Retrieval",
        "为通用领域问题生成表示，用于匹配相关文本",
        "Given a Chinese search query, retrieve web passages that answer the question",
    ),
    _retrieval(
        "VideoRetrieval",
        "为简短用户问题生成表示，用于匹配视频标题或视频描述",
        "Given a video search query, retrieve the titles of relevant videos",
    ),
    _sts(
        "AFQMC",
        "validation",
        "为金融领域句子生成表示",
        "Represent the text in conversations between users and financial customer service, retrieve semantically similar text",
    ),
    _sts(
        "ATEC",
        "test",
        "为金融领域客服场景的句子生成表示",
        "Represent the text in conversations between users and financial customer service, retrieve semantically similar text",
    ),
    _sts(
        "BQ",
        "test",
        "为银行客服对话中的句子生成表示",
        "Represent the user problem descriptions when handling bank credit business, retrieve semantically similar text",
    ),
    _sts(
        "LCQMC",
        "test",
        "为通用领域句子生成表示",
        "Represent the user question descriptions on general question-answering platforms, retrieve semantically similar text",
    ),
    _sts(
        "PAWSX",
        "test",
        "为英文翻译得到的中文句子生成表示",
        "Represent the Chinese Translations of English Encyclopedias, retrieve semantically similar text",
    ),
    _sts(
        "QBQTC",
        "test",
        "为搜索引擎的搜索文本生成表示",
        "Represent the web search query, retrieve semantically similar text",
    ),
    _sts(
        "STSB",
        "test",
        "为简短的通用领域句子生成表示",
        "Represent the short general domain sentences, retrieve semantically similar text",
    ),
)

CMTEB_TASK_NAMES: tuple[str, ...] = tuple(spec.name for spec in CMTEB_TASKS)
_BY_NAME = {spec.name: spec for spec in CMTEB_TASKS}


def get_task_spec(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of one of the 15 paper tasks.

    Raises:
        ValueError: If ``name`` is not one of :data:`CMTEB_TASK_NAMES`.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"Unknown C-MTEB task {name!r}; expected one of {list(CMTEB_TASK_NAMES)}.") from None


def instruction_prompts(
    task_names: Iterable[str] | None = None,
    language: Literal["zh", "en"] = "zh",
    template: str = OFFICIAL_INSTRUCTION_TEMPLATE,
) -> dict[str, str]:
    """The official instructions as an mteb prompt dictionary.

    Keys follow mteb's prompt lookup: ``"<Task>-query"`` for a retrieval task (queries only, passages get no prompt)
    and ``"<Task>"`` for an STS task (both sentences). Tasks without an official instruction are left out, so they
    keep the model's own prompts.

    Args:
        task_names: The tasks to include; ``None`` means all 15. Names outside the 15 are ignored.
        language: ``"zh"`` for the Chinese instructions the paper used, ``"en"`` for the English ones.
        template: How an instruction becomes a prefix; must contain ``{instruction}``.

    Returns:
        A mapping from mteb prompt key to the full prefix text.

    Raises:
        ValueError: If ``language`` or ``template`` is invalid.
    """
    if language not in ("zh", "en"):
        raise ValueError(f"language must be 'zh' or 'en', got {language!r}.")
    if "{instruction}" not in template:
        raise ValueError(f"template must contain '{{instruction}}', got {template!r}.")
    names = CMTEB_TASK_NAMES if task_names is None else [name for name in task_names if name in _BY_NAME]
    prompts = {}
    for name in names:
        spec = _BY_NAME[name]
        text = spec.instruction if language == "zh" else spec.instruction_en
        key = f"{name}-query" if spec.type == "retrieval" else name
        prompts[key] = template.format(instruction=text)
    return prompts


@dataclass
class PreparedTask:
    """An mteb task with its data loaded and everything needed to report it.

    Args:
        task: The mteb task object (its real class for known tasks), data loaded, one evaluation split.
        type: ``"retrieval"``, ``"sts"``, or mteb's task type in lower case for other kinds.
        split: The evaluated split.
        source: Where the data came from: the local folder, or ``"mteb"`` (the Hugging Face hub or a given task).
        corpus_subsample: What the corpus subsample kept, or ``None`` for the full corpus.
    """

    task: AbsTask
    type: str
    split: str
    source: str
    corpus_subsample: CorpusSubsample | None = None

    @property
    def name(self) -> str:
        return self.task.metadata.name


def task_kind(task: AbsTask) -> str:
    """``"retrieval"``/``"sts"`` for those mteb types, otherwise the mteb type in lower case."""
    mteb_type = task.metadata.type
    return {"Retrieval": "retrieval", "STS": "sts"}.get(mteb_type, mteb_type.lower())


def _find_local(name: str | Path, local_tasks: Sequence[LocalTaskInfo]) -> LocalTaskInfo | None:
    path = Path(name)
    if (path / "task.json").is_file():
        return LocalTaskInfo.from_folder(path)
    for info in local_tasks:
        if str(name) in (info.name, info.path.name, info.mteb_task):
            return info
    return None


def _unknown_task_message(
    name: str, data_dir: str | Path | None, local_tasks: Sequence[LocalTaskInfo], error: KeyError
) -> str:
    """One line (the command line prints the first line of an error): what was searched and what to do."""
    if data_dir is None:
        searched = "no local folders were searched (no data_dir given)"
    else:
        names = ", ".join(sorted(info.path.name for info in local_tasks)) or "none"
        searched = f"no task folder in {Path(data_dir).absolute()} matches it by name, folder or mteb_task ({names})"
    if Path(name).is_dir():
        searched = f"the folder {name} has no task.json, and {searched}"
    mteb_reason = str(error.args[0]) if error.args else "not found"
    return (
        f"Unknown task {name!r}: {searched}; mteb has no task of that name either ({mteb_reason}). Pass a task "
        "folder, a data_dir holding it, or an mteb task name."
    )


def _resolve_name(name: str | Path, data_dir: str | Path | None) -> LocalTaskInfo | AbsTask:
    """A task name or folder as a local task (``data_dir`` first) or an mteb task object (no data loaded)."""
    import mteb

    local_tasks = find_local_tasks(data_dir) if data_dir is not None else []
    info = _find_local(name, local_tasks)
    if info is not None:
        return info
    name = str(name)
    split = get_task_spec(name).split if name in _BY_NAME else None
    try:
        return mteb.get_task(name, eval_splits=[split] if split else None)
    except KeyError as error:
        # mteb's bare KeyError says nothing about the local folders that were searched first.
        raise ValueError(_unknown_task_message(name, data_dir, local_tasks, error)) from None


def check_task_name(task: str | Path, *, data_dir: str | Path | None = None) -> None:
    """Check that a task name or folder resolves, without loading its data (a quick check before heavy work).

    Args:
        task: A local task folder or a task name, as :func:`prepare_task` takes it.
        data_dir: A folder of local task folders.

    Raises:
        ValueError: If the name matches no local folder and no mteb task (the message lists the folders searched),
            or a local ``task.json`` is invalid.
    """
    _resolve_name(task, data_dir)


def prepare_task(
    task: str | Path | LocalTaskInfo | AbsTask | PreparedTask,
    *,
    data_dir: str | Path | None = None,
    corpus_cap: int | None = None,
    seed: int = 0,
) -> PreparedTask:
    """Resolve a task and load its data: local data first, the Hugging Face hub otherwise.

    Args:
        task: A local task folder, a task name (matched against the folders in ``data_dir`` by name, folder name or
            ``mteb_task``, else loaded with ``mteb.get_task``; one of the 15 C-MTEB names gets the paper's split),
            a :class:`LocalTaskInfo`, an mteb task object with a single evaluation split, or a
            :class:`PreparedTask` (returned as is).
        data_dir: A folder of local task folders (see :mod:`codiemb_st.evaluation.local_data`).
        corpus_cap: If set, retrieval corpora larger than this are subsampled, keeping every judged passage.
        seed: Seed of the corpus subsample.

    Returns:
        The prepared task.

    Raises:
        TypeError: If ``task`` has an unsupported type.
        ValueError: If a given mteb task evaluates several splits, or a task name matches no local folder and no
            mteb task (the message lists the folders searched).
        Exception: Whatever mteb raises when hub data cannot be loaded (e.g. offline).
    """
    from mteb.abstasks import AbsTask

    if isinstance(task, PreparedTask):
        return task
    if corpus_cap is not None:
        check_positive_int("corpus_cap", corpus_cap)
    source = "mteb"
    if isinstance(task, LocalTaskInfo):
        info = task
    elif isinstance(task, (str, Path)):
        resolved = _resolve_name(task, data_dir)
        info = resolved if isinstance(resolved, LocalTaskInfo) else None
        if info is None:
            task = resolved
    elif isinstance(task, AbsTask):
        info = None
    else:
        raise TypeError(
            f"task must be a task name, a task folder, a LocalTaskInfo or an mteb AbsTask, got {type(task).__name__}."
        )
    if info is not None:
        task = load_local_task(info)
        source = str(info.path)
    splits = list(task.eval_splits)
    if len(splits) != 1:
        raise ValueError(
            f"Task {task.metadata.name!r} evaluates several splits {splits}; pick one with "
            f"mteb.get_task({task.metadata.name!r}, eval_splits=[...])."
        )
    if not task.data_loaded:
        logger.info("Loading %s from the Hugging Face hub", task.metadata.name)
        task.load_data()
    prepared = PreparedTask(task=task, type=task_kind(task), split=splits[0], source=source)
    if corpus_cap is not None and prepared.type == "retrieval":
        prepared.corpus_subsample = subsample_task_corpus(task, corpus_cap, seed)
    return prepared


def prepare_tasks(
    tasks: Iterable[str | Path | LocalTaskInfo | AbsTask | PreparedTask],
    *,
    data_dir: str | Path | None = None,
    corpus_cap: int | None = None,
    seed: int = 0,
) -> list[PreparedTask]:
    """:func:`prepare_task` for each task; task names must be unique.

    Raises:
        ValueError: If no task is given or two tasks share a name.
    """
    prepared = [prepare_task(task, data_dir=data_dir, corpus_cap=corpus_cap, seed=seed) for task in tasks]
    if not prepared:
        raise ValueError("tasks is empty: give at least one task.")
    names = [task.name for task in prepared]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"Each task may appear once; duplicated: {duplicates}.")
    return prepared
