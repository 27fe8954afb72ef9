"""Read and write the per-rank checkpoint layout of Megatron-LLM (old Megatron-LM).

Why: users arrive with checkpoints trained or converted by epfLLM's
Megatron-LLM (``weights_conversion/hf_to_megatron.py``, ``finetune.py``) and
may want to hand our models back to it. Our models are megatron-core
``GPTModel``s whose *unsharded* weights (TP=1/PP=1 megatron-core names, see
:mod:`megatron_ext.models.hf_llama`) are the exchange format; this module
translates between that and Megatron-LLM's files, merging or splitting tensor-
and pipeline-parallel shards. The package is split by job: ``files`` (rank
file names, detection), ``unpickling``, ``args`` (args <-> ModelArgs),
``tensors`` (tensor layouts), ``read`` and ``write``.

What Megatron-LLM writes (read from github.com/epfLLM/Megatron-LLM, commit
806a833; paraphrased, file references in brackets):

Files [megatron/checkpointing.py: get_checkpoint_name, save_checkpoint,
read_metadata]
    ``ROOT/latest_checkpointed_iteration.txt`` holds an iteration number or
    ``release``. Weights are in ``ROOT/iter_{n:07d}/`` (or ``ROOT/release/``),
    one file per model-parallel rank: ``mp_rank_{tp:02d}/model_optim_rng.pt``
    when PP=1, ``mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt`` when PP>1.
    With ``--use_distributed_optimizer`` the model file is ``model_rng.pt`` and
    the optimizer lives in separate ``..._{dp:03d}/optim.pt`` directories (we
    read the model file and ignore those). Each file is a ``torch.save``'d dict:
    ``args`` (the run's ``argparse.Namespace``), ``checkpoint_version`` (3.0),
    ``iteration`` (int, or the string ``"release"``), ``model`` (below) and,
    from training runs, ``optimizer``, ``opt_param_scheduler``, ``rng_state``.
    A virtual-pipeline run stores ``model0``, ``model1``... (refused here).

``model`` [megatron/model/gpt_model.py, language_model.py: state_dict_for_save_checkpoint]
    ``{'language_model': {'embedding': {'word_embeddings': {'weight'}, 'position_embeddings':
    {'weight'}}, 'encoder': {flat transformer keys}, 'lm_head': <tensor>}}``.
    ``position_embeddings`` exists only for absolute positions; ``lm_head``
    (a bare tensor, not a dict) only when ``tie_embed_logits`` is false. When
    embeddings are tied and PP>1, the last stage also carries a replica of its
    vocabulary shard as ``model['word_embeddings_for_head'] = {'weight'}``.
    Older layouts still accepted by its loader (and by ours): encoder under
    ``transformer`` with ``.attention.`` instead of ``.self_attention.``, and a
    flat ``embedding['word_embeddings.weight']`` -- exactly what
    ``hf_to_megatron.py`` writes.

Encoder keys [megatron/model/transformer.py: ParallelTransformer(Layer), ParallelAttention, ParallelMLP]
    ``layers.{i}.input_layernorm.weight`` (+``.bias`` for LayerNorm),
    ``layers.{i}.self_attention.query_key_value.weight``/``.bias``,
    ``layers.{i}.self_attention.dense.weight``/``.bias``,
    ``layers.{i}.post_attention_layernorm.weight`` (+``.bias``),
    ``layers.{i}.mlp.dense_h_to_4h.weight``/``.bias``,
    ``layers.{i}.mlp.dense_4h_to_h.weight``/``.bias``, and on the last stage
    ``final_layernorm.weight`` (+``.bias``). Linear biases exist only with
    ``--use_bias`` (default off); RMSNorm has no bias. ``i`` restarts at 0 on
    every pipeline stage: stage ``p`` holds global layers
    ``[p*L/PP, (p+1)*L/PP)`` (``_get_num_layers`` requires ``L % PP == 0``);
    the embedding lives on stage 0, final norm and ``lm_head`` on the last.

Falcon [megatron/model/falcon_model.py; transformer.py ParallelTransformerLayer with
``parallel_attn``]
    ``x + attention(input_layernorm(x)) + mlp(...)``: the MLP reads
    ``input_layernorm``'s output (Falcon-7B), or with ``parallel_layernorm``
    (Falcon-40B) its own ``layers.{i}.mlp_layernorm.weight``/``.bias`` (our
    ``pre_mlp_layernorm``); no ``post_attention_layernorm``; LayerNorm, exact GeLU,
    rotary (rows permuted as below), tied embeddings, no linear biases (its model
    asserts ``use_bias`` off). Multi-query is just ``num_attention_heads_kv`` 1. Our
    ``falcon`` family with ``parallel_attn_norms`` 1 or 2.

Tensor parallelism [tools/checkpoint_loader_megatron.py, checkpoint_saver_megatron.py]
    Column-parallel (rows split, dim 0): word embeddings and ``lm_head``
    (vocabulary rows), ``query_key_value`` weight and bias, ``dense_h_to_4h``
    weight and bias. Row-parallel (dim 1): ``dense`` and ``dense_4h_to_h``
    weights; their biases, all norms and position embeddings are replicated.

QKV rows [transformer.py ParallelAttention.forward; hf_to_megatron.py rearrange_qkv]
    Grouped per key/value head, like megatron-core: for each of the
    ``num_attention_heads_kv`` groups, its query heads, then its key head,
    then its value head (the view ``[.., groups, q_per_kv + 2, head_dim]``).
    TP ranks get whole groups, so heads and kv heads must divide by TP.

Rotary [megatron/model/positional_embeddings.py; weights_conversion/utils/permute_qkv.py]
    Megatron-LLM applies Meta's complex rotary: dimensions ``(2j, 2j+1)`` of a
    head form one rotated pair at frequency ``theta**(-2j/d)``.
    megatron-core (``rotary_interleaved=False``, our setting) pairs ``(j,
    j+d/2)`` at the same frequency (rotate-half, as in HF). So every query and
    key head's rows are permuted: Megatron-LLM row ``2j+a`` is our row
    ``a*d/2 + j`` -- ``permute_qkv`` (HF to Megatron-LLM) and its
    ``revert=True`` (Megatron-LLM to HF) do this; value rows are untouched.
    Attention scores are identical after the permutation (tested).

SwiGLU [megatron/model/glu_activations.py; tools/checkpoint_loader_megatron.py]
    ``dense_h_to_4h`` output is chunked ``x1, x2`` and activated as
    ``x1 * silu(x2)``: rows are ``[up; gate]`` (``w3; w1`` in Meta's names),
    the *reverse* of megatron-core's ``[gate; up]``. Each TP rank holds
    ``[up_r; gate_r]`` of its slice, not a contiguous slice of the full matrix.

Arguments [megatron/checkpointing.py: load_args_from_checkpoint, check_checkpoint_args;
tools/checkpoint_loader_megatron.py; megatron/arguments.py]
    Copied from the checkpoint by ``--use_checkpoint_args`` and the tools:
    ``num_layers, hidden_size, ffn_hidden_size, seq_length,
    num_attention_heads, num_attention_heads_kv, kv_channels,
    max_position_embeddings, tokenizer_type, padded_vocab_size,
    position_embedding_type ('rotary'|'absolute', a string or its enum),
    use_rms_norm, glu_activation, tie_embed_logits, parallel_attn,
    parallel_layernorm, make_vocab_size_divisible_by, sliding_window_size,
    tensor_model_parallel_size, pipeline_model_parallel_size, bias_gelu_fusion,
    bias_droput_fusion`` (sic); compared on a non-finetune load:
    ``num_layers, hidden_size, num_attention_heads`` and the TP/PP sizes; the
    converter additionally requires ``params_dtype`` and ``iteration``. Not
    copied (must be given on Megatron-LLM's command line): ``model_name``,
    ``use_bias``, ``rope_theta``, ``layernorm_epsilon``. Argparse defaults
    apply to fields a file lacks (``use_bias`` False, ``tie_embed_logits``
    True, ``num_attention_heads_kv`` = heads, ``ffn_hidden_size`` = 4h,
    ``rope_theta`` 1e4, ``layernorm_epsilon`` 1e-5).

Safety: legacy files are pickles (``args`` is a Namespace, possibly holding
Megatron-LLM enum objects), read by a restricted unpickler that runs nothing
from the file: tensors, containers and ``Namespace`` load as themselves, every
other class or function a file names (``megatron.model.enums``..., or
``os.system`` in a hostile file) is replaced by an inert stand-in
(:class:`LegacyObject`) instead of being imported or called.

Not represented (refused, never silently changed): a ``parallel_layernorm``
without ``parallel_attn``, post-LN, residual-after-norm, rotary scaling, GLUs other
than SwiGLU, ``kv_channels != hidden/heads``, virtual pipelines, a standalone
embedding stage, upstream Megatron-LM's rotary/SwiGLU conventions.
"""

from megatron_ext.checkpointing.legacy.args import (
    legacy_args_to_model_args,
    model_args_to_legacy_args,
    resolve_model_args,
)
from megatron_ext.checkpointing.legacy.files import (
    CHECKPOINT_VERSION,
    DISTRIBUTED_OPTIMIZER_MODEL_FILE,
    MODEL_FILE,
    is_legacy,
    read_legacy_tracker,
)
from megatron_ext.checkpointing.legacy.read import (
    LegacyCheckpoint,
    legacy_to_megatron_state,
    read_legacy_checkpoint,
)
from megatron_ext.checkpointing.legacy.tensors import permute_rotary_rows
from megatron_ext.checkpointing.legacy.unpickling import LegacyObject, load_legacy_file
from megatron_ext.checkpointing.legacy.write import (
    megatron_to_legacy_shards,
    write_legacy_checkpoint,
)

__all__ = [
    "CHECKPOINT_VERSION", "DISTRIBUTED_OPTIMIZER_MODEL_FILE", "MODEL_FILE", "LegacyCheckpoint",
    "LegacyObject", "is_legacy", "legacy_args_to_model_args", "legacy_to_megatron_state",
    "load_legacy_file", "megatron_to_legacy_shards", "model_args_to_legacy_args",
    "permute_rotary_rows", "read_legacy_checkpoint", "read_legacy_tracker", "resolve_model_args",
    "write_legacy_checkpoint",
]
