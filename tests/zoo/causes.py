"""Why the engine (commit 37463ac) fails on some zoo cases: one entry per cause, with the outcome seen.

Each test module maps its cases to these in a table ``EXPECTED``; every entry becomes a strict xfail
whose ``raises`` is the exception seen, so a fix that lands (or a new failure mode) is noticed.
Cases the engine refuses on purpose, with an error that names the cause and the fix, are tested as
refusals instead (``test_refused_with_the_fix`` in the modules concerned).
"""

from dp_microclip.errors import UnsupportedModuleError

WHISPER_POSITIONS = (UnsupportedModuleError, (
    "refused: the decoder's WhisperPositionalEmbedding (an nn.Embedding subclass, so the Embedding rule "
    "applies) is called with position_ids as a keyword tensor; UnsupportedModuleError 'was called with "
    "tensor keyword argument position_ids; pass tensors positionally'. The user cannot change HF's call. "
    "Cross-attention further on is not reached"))
RNN_TUPLE = (UnsupportedModuleError, (
    "refused: nn.LSTM / GRU / RNN return (output, h_n) or (output, (h_n, c_n)), packed or not; "
    "UnsupportedModuleError 'rnn (LSTM) returned tuple; ... needs layers with trainable parameters to "
    "return one tensor'"))
CROSS_ATTENTION = (UnsupportedModuleError, (
    "refused: nn.TransformerDecoderLayer.multihead_attn is cross-attention (query is not key/value); "
    "UnsupportedModuleError 'called with different query/key/value (cross-attention) ... supports "
    "self-attention for now'"))
