"""K members of one architecture trained and run as one batched model.

The members' parameters are stacked along a new leading dimension (``torch.func.stack_module_state``)
and one ``vmap``-ed ``functional_call`` runs all K on a batch: one forward, one backward and one
optimizer step per batch instead of K of each.

Training a :class:`BatchedMembers` with the *sum* of the members' losses gives every member exactly
the gradient of its own loss (member k's parameters appear only in member k's output). An optimizer
whose update is elementwise (SGD with momentum and weight decay, Adam, AdamW) then updates each
slice ``[k]`` of a stacked tensor exactly as a separate optimizer would update member k: its state
(momentum, moments) is stacked too. What would couple the members: clipping by a global gradient
norm, or batch-norm layers evaluated on the members' outputs together (each member's own batch-norm
layers are fine: their running statistics are stacked buffers).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


class BatchedMembers(nn.Module):
    """K modules of one architecture as one: ``forward(x)`` returns the members' outputs ``(K, B, ...)``.

    Every member sees the same input batch. Parameters live as stacked tensors (``(K, *shape)``),
    registered under their dotted names with ``.`` replaced by ``__``; :meth:`unstack` gives the K
    members back as ordinary modules. Dropout draws different masks for each member.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("BatchedMembers needs at least one member")
        first = members[0]
        shapes = _signature(first)
        for i, m in enumerate(members[1:], 1):
            if type(m) is not type(first) or _signature(m) != shapes:
                raise ValueError(f"member {i} ({type(m).__name__}) does not have member 0's architecture "
                                 f"({type(first).__name__}): batched members must share parameter names and shapes")
        params, buffers = stack_module_state(members)
        self.num_members = len(members)
        self._param_names = list(params)
        self._buffer_names = list(buffers)
        for name, p in params.items():
            self.register_parameter(_key(name), nn.Parameter(p.detach()))
        for name, b in buffers.items():
            self.register_buffer(_key(name), b)
        # The architecture without storage: functional_call swaps the stacked slices in. Kept out of
        # the module tree (a tuple) so that it is neither a submodule nor in the state dict.
        self._template = (copy.deepcopy(first).to("meta"),)

    def _stacked(self) -> tuple[dict, dict]:
        params = {n: getattr(self, _key(n)) for n in self._param_names}
        buffers = {n: getattr(self, _key(n)) for n in self._buffer_names}
        return params, buffers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        template = self._template[0]
        template.train(self.training)

        def one(params, buffers, inp):
            return functional_call(template, (params, buffers), (inp,))

        params, buffers = self._stacked()
        return vmap(one, in_dims=(0, 0, None), randomness="different")(params, buffers, x)

    def unstack(self) -> list[nn.Module]:
        """The K members as separate modules (copies of the current weights, on this module's device)."""
        params, buffers = self._stacked()
        device = next(iter(params.values())).device
        out = []
        for k in range(self.num_members):
            m = copy.deepcopy(self._template[0]).to_empty(device=device)
            with torch.no_grad():
                for name, t in params.items():
                    m.get_parameter(name).copy_(t[k])
                for name, t in buffers.items():
                    m.get_buffer(name).copy_(t[k])
            m.train(self.training)
            out.append(m)
        return out

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, member={type(self._template[0]).__name__}"


def member_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The sum over members of each member's mean cross-entropy; ``outputs`` is ``(K, B, C)``.

    The sum (not the mean) keeps each member's gradient equal to the one it would get alone.
    """
    K, B, C = outputs.shape
    return F.cross_entropy(outputs.reshape(K * B, C), targets.repeat(K), reduction="sum") / B


def _key(name: str) -> str:
    return name.replace(".", "__")


def _signature(m: nn.Module) -> list:
    return [(n, t.shape, t.dtype) for n, t in [*m.named_parameters(), *m.named_buffers()]]
