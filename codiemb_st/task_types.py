"""One place for the task names of training and evaluation, and how they map.

Training groups datasets by CoDiEmb's two tasks, ``"ir"`` (queries and passages: IR records, the InfoNCE loss) and
``"sts"`` (scored pairs: the Pearson/rank-KL/PRO loss); the names are those of the official data's ``task_type``
field and of :class:`~codiemb_st.RoundRobinTaskBatchSampler`'s default tasks. Evaluation uses mteb's task types,
where the IR task is ``"retrieval"``; the aggregate keys (``mean_retrieval`` ...) follow mteb's names. The two
vocabularies are kept (renaming either would break the data files or mteb's results); this table is their mapping.
"""

from __future__ import annotations

#: The training tasks, in CoDiEmb's order.
TRAINING_TASKS = ("ir", "sts")

#: Training task -> the mteb task type that evaluates it.
EVALUATION_TASK_TYPE = {"ir": "retrieval", "sts": "sts"}

__all__ = ["EVALUATION_TASK_TYPE", "TRAINING_TASKS"]
