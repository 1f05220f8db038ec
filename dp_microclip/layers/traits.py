"""What the engine must know about layer types beyond their gradient rules, in one place.

* ``CHANNELS_FIRST``: torch's ``(N, C, ...)`` layouts, whose batch dimension is 0 whatever the model's.
* ``MIXES_EXAMPLES``: statistics over the whole batch (BatchNorm): refused in DP mode; noise-free
  the result is not the naive per-micro-batch loop's.
* ``INDEPENDENT_WITHOUT_RULE``: no rule, but each example is computed on its own, so the exact
  generic ``torch.func`` path is allowed in DP mode without ``fallback="generic"`` (RNNs).
* ``NOT_REPLAYABLE``: layers whose forward updates state in place (running statistics), which the
  generic path cannot replay: ``grad_mode="func"`` keeps their rule.
"""

from __future__ import annotations

from torch import nn

CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
                  nn.modules.instancenorm._InstanceNorm, nn.PReLU)
MIXES_EXAMPLES = (nn.modules.batchnorm._BatchNorm,)
INDEPENDENT_WITHOUT_RULE = (nn.RNNBase,)
NOT_REPLAYABLE = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
