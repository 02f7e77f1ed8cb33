"""DEBATER (arXiv 2502.12974; OpenBMB/DEBATER): a document thinks through a chain of deliberation tokens.

As the reference's code formats them: a document is `{text} Use eight words to represent the above text
in multiple aspects: ` followed by the first K deliberation tokens (K = `refinement_steps`; MiniCPM's
`<reserved_12>`..`<reserved_19>` by default), a query `{instruction} {query}</s>`; both tokenized whole
with the tokenizer's own special tokens (BOS). One forward pass: the model's own Hugging Face
implementation over a left-padded batch, as the reference runs it (so MiniCPM, remote code or
`minicpm3`, serves), or packed through the fast runner where it implements the family: the vector
is the last token's final-layer state; a document's trajectory (every deliberation token's state,
the reference's M-token pooling for max-sim) comes from the same pass.
"""

from __future__ import annotations

import torch

from model_server.methods.pooled import PooledMethod
from model_server.sequence import Embedded, Joining


class DebaterMethod(PooledMethod):
    padding_side = "left"

    def _finish(self, seq: Joining, states: torch.Tensor) -> Embedded:
        rows = states.to(torch.promote_types(states.dtype, torch.float32))
        # The state of deliberation token i is what K = i would give (causal attention): the trajectory.
        k = seq.input.steps
        return self.embedded(rows[-1], k, seq.input.params.trajectory, rows[len(rows) - k :] if k else None)
