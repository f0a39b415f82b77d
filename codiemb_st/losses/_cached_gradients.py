"""Gradient hand-off of :class:`codiemb_st.losses.MultiPositiveCachedInfoNCELoss`'s GradCache paths: the
single-pass path (every embedding keeps its graph) and the kept-graphs-then-replay hook."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import tqdm
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from codiemb_st._compat import get_world_size, gradcache_replay_hook, is_dist_initialized

logger = logging.getLogger("codiemb_st.losses.multi_positive_infonce")


def _scaled_gradient(grad: Tensor, grad_output: Tensor, dtype: torch.dtype) -> Tensor:
    """``grad * grad_output`` in the precision sentence-transformers' replay surrogate uses, cast to ``dtype``.

    The mixin back-propagates ``dot(embeddings, grad) * grad_output`` in at least float32; computing the same product
    here gives a kept graph the gradient a replay would give it, also under fp16/bf16 autocast.
    """
    precision = torch.promote_types(dtype, grad.dtype)
    if precision in (torch.float16, torch.bfloat16):
        precision = torch.float32
    return (grad.to(precision) * grad_output.to(precision)).to(dtype)


class _CachedGradientsToGraphs(torch.autograd.Function):
    """Return the (detached) loss value; backward hands every embedding its cached gradient times the incoming one.

    This is the single-pass path: every embedding still carries its graph, so the outer ``loss.backward()`` goes
    through all of them in one ordinary backward pass (DDP synchronises once, as for an uncached loss) and the
    incoming gradient (gradient accumulation division, fp16 loss scale) reaches all of them.
    """

    @staticmethod
    def forward(ctx: Any, loss: Tensor, grads: list[Tensor], *embeddings: Tensor) -> Tensor:
        ctx.grads = grads
        ctx.dtypes = [embedding.dtype for embedding in embeddings]
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grads = [
            _scaled_gradient(grad, grad_output, dtype) if needed else None
            for grad, dtype, needed in zip(ctx.grads, ctx.dtypes, ctx.needs_input_grad[2:])
        ]
        ctx.grads = None
        return (None, None, *grads)


def _backward_kept_then_replay(
    grad_output: Tensor, kept: list[Tensor], kept_grads: list[Tensor], replay: Callable[[Tensor], None]
) -> None:
    """Hook on the returned loss: back-propagate the kept graphs, then replay the other mini-batches.

    The kept graphs go first so that their activations are freed before the replay builds one more mini-batch: peak
    memory stays that of the classic passes. They were built under DDP ``no_sync`` and are back-propagated before any
    replay, so their gradients accumulate locally and are synchronised with the replay's once, by the mixin's hook
    (which synchronises on its last mini-batch only).
    """
    with torch.enable_grad():
        trainable = [(embedding, grad) for embedding, grad in zip(kept, kept_grads) if embedding.requires_grad]
        if trainable:
            torch.autograd.backward(
                [embedding for embedding, _ in trainable],
                [_scaled_gradient(grad, grad_output, embedding.dtype) for embedding, grad in trainable],
            )
    kept.clear()  # the graphs are spent; let the embeddings go with them
    replay(grad_output)


class KeptGraphsMixin:
    """GradCache with kept graphs: embed the step's last mini-batches with their autograd graphs in the first pass
    and replay only the others (see ``keep_graphs`` of :class:`codiemb_st.losses.MultiPositiveCachedInfoNCELoss`).

    Expects the host loss to have ``gather_across_devices``, ``keep_graphs``, ``show_progress_bar``,
    ``embed_minibatch`` and ``calculate_loss`` (sentence-transformers' ``CachedLossMixin``).
    """

    def _num_kept_graphs(
        self, ranges: list[list[tuple[int, int]]], sentence_features: list[dict[str, Tensor]], ddp: bool
    ) -> int:
        """How many of the step's mini-batches (the last ones) to embed with gradients in the first pass.

        All of them (single pass) when every column fits in one mini-batch or the step has at most ``keep_graphs``
        mini-batches. When gathering, that must hold on every rank (max over ranks): the path decides which passes
        and backward calls a rank runs, and ranks whose sequences of collectives depend on their own data are what
        deadlocks gathering. (The loss's collectives run in the forward pass on both paths today; deciding together
        keeps the ranks in step by construction, whatever a path does.) Otherwise at most ``keep_graphs``, leaving
        at least one mini-batch to replay, so that a rank never takes the single pass alone.

        Under DDP the kept graphs accumulate locally and rely on a replayed mini-batch to synchronise them, which a
        frozen one cannot (e.g. a Router whose query route is frozen). A mini-batch of the same column goes through
        the same modules, so under DDP graphs are kept from the last column only, one of whose mini-batches is
        always replayed: then a trainable kept graph always has a trainable replay after it.
        """
        most_per_column = max(len(column_ranges) for column_ranges in ranges)
        total = sum(len(column_ranges) for column_ranges in ranges)
        global_most_per_column, global_total = most_per_column, total
        if self.gather_across_devices and is_dist_initialized() and get_world_size() > 1:
            device = next(v.device for v in sentence_features[0].values() if isinstance(v, Tensor))
            stats = torch.tensor([most_per_column, total], device=device)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            global_most_per_column, global_total = stats.tolist()
        if global_most_per_column == 1 or global_total <= self.keep_graphs:
            return total
        if ddp:
            return min(self.keep_graphs, len(ranges[-1]) - 1)
        return min(self.keep_graphs, total - 1)

    def _forward_keeping_graphs(
        self,
        sentence_features: list[dict[str, Tensor]],
        labels: Tensor | None,
        ranges: list[list[tuple[int, int]]],
        num_kept: int,
        model: nn.Module,
    ) -> Tensor:
        total = sum(len(column_ranges) for column_ranges in ranges)
        first_kept = total - num_kept
        single_pass = num_kept == total
        logger.debug(
            "%s: %s (%d of %d mini-batches kept)",
            type(self).__name__,
            "single pass" if single_pass else "GradCache with kept graphs",
            num_kept,
            total,
        )
        # A kept graph of a multi-pass step must not arm DDP's reducer: the replayed mini-batches are
        # back-propagated after it and the mixin's hook synchronises on the last of them. A single pass is an
        # ordinary forward/backward and synchronises as usual.
        ddp = isinstance(model, DistributedDataParallel)
        kept_context = model.no_sync if ddp and num_kept and not single_pass else nullcontext

        # First pass, in the order of the plain passes, so every mini-batch draws the same random numbers (dropout
        # masks) as it would there; a replay reproduces exactly these, so a kept graph is what a replay would build.
        reps: list[list[Tensor]] = []
        random_states: list[list[Any]] = []
        kept: list[Tensor] = []
        index = 0
        for feature, column_ranges in zip(sentence_features, ranges):
            reps_mbs, states = [], []
            for begin, end in tqdm.tqdm(column_ranges, desc="Embed mini-batches", disable=not self.show_progress_bar):
                keep = index >= first_kept
                with kept_context() if keep else nullcontext():
                    embedding, state = self.embed_minibatch(
                        sentence_feature=feature,
                        begin=begin,
                        end=end,
                        with_grad=keep,
                        # Only the replayed mini-batches need their RNG state (snapshots draw no random numbers).
                        copy_random_state=not keep,
                    )
                if keep:
                    kept.append(embedding)
                reps_mbs.append(embedding.detach().requires_grad_())
                states.append(state)
                index += 1
            reps.append(reps_mbs)
            random_states.append(states)

        # The loss and the gradients w.r.t. the embeddings, by the same chunked code as the plain passes.
        loss = self.calculate_loss(reps, labels, with_backward=True)
        cache = [[rep.grad for rep in rep_mbs] for rep_mbs in reps]
        unused = [str(column) for column, grads in enumerate(cache) if any(grad is None for grad in grads)]
        if unused:
            raise ValueError(
                f"The loss computation of {type(self).__name__} did not use input column(s) {', '.join(unused)}: "
                "their embeddings received no gradient. Remove the unused column(s) from the dataset."
            )
        flat_cache = [grad for grads in cache for grad in grads]
        kept_grads = flat_cache[first_kept:]

        if single_pass:
            if not any(embedding.requires_grad for embedding in kept):  # a frozen model: nothing to back-propagate
                return loss.detach().requires_grad_()
            return _CachedGradientsToGraphs.apply(loss.detach(), kept_grads, *kept)

        # The replayed mini-batches are a prefix of every column (the kept ones are the last of the step).
        replay_cache, replay_states, replay_ranges = [], [], []
        index = 0
        for grads, states, column_ranges in zip(cache, random_states, ranges):
            count = max(0, min(len(column_ranges), first_kept - index))
            replay_cache.append(grads[:count])
            replay_states.append(states[:count])
            replay_ranges.append(column_ranges[:count])
            index += len(column_ranges)
        replay = partial(
            gradcache_replay_hook,
            sentence_features=sentence_features,
            loss_obj=self,
            cache=replay_cache,
            random_states=replay_states,
            ranges=replay_ranges,
        )
        # Everything the backward pass needs travels in the hook, none of it on self.
        loss = loss.detach().requires_grad_()
        loss.register_hook(partial(_backward_kept_then_replay, kept=kept, kept_grads=kept_grads, replay=replay))
        return loss
