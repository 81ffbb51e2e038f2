"""The operators an uploaded TorchScript or torch.export graph may call: a positive list.

Written once, as plain names, for both walls: the API reads an archive's TorchScript source
and exported graph against it without torch (``service/models/sniff.py``), and the engine
checks every node of the loaded graph against it before the first forward pass
(``workers/engine/graph_check.py``). An operator is on the list only if it computes on tensors
or on the graph's own scalars and lists: nothing that reads or writes files, prints, warns with
data, loads a library, seeds the generator, or calls into classes of its own. Anything not
named here is refused, with its name.
"""

from __future__ import annotations

# ``aten`` operators, by name without overload. TorchScript writes them ``aten::name``
# (``torch.name`` in its source), torch.export ``torch.ops.aten.name.overload``.
ATEN: frozenset[str] = frozenset({
    # convolution, linear algebra
    "conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "linear", "matmul", "mm", "bmm", "addmm",
    "addmv", "addbmm", "baddbmm", "mv", "dot", "einsum", "outer", "t", "numpy_T",
    "_native_multi_head_attention", "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
    # normalisation
    "batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional", "native_batch_norm", "_batch_norm_impl_index",
    "_batch_norm_with_update", "_batch_norm_no_update", "instance_norm", "layer_norm",
    "native_layer_norm", "group_norm", "native_group_norm", "local_response_norm", "rms_norm",
    "norm", "linalg_vector_norm", "frobenius_norm", "renorm", "normalize",
    # pooling, resampling, padding
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "upsample_nearest1d",
    "upsample_nearest2d", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d",
    "_upsample_nearest_exact2d", "_upsample_bilinear2d_aa", "pixel_shuffle",
    "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle", "pad", "constant_pad_nd",
    "reflection_pad1d", "reflection_pad2d", "replication_pad1d", "replication_pad2d",
    "grid_sampler", "grid_sampler_2d", "affine_grid_generator", "im2col", "col2im",
    # activations
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "selu_",
    "celu", "gelu", "gelu_", "silu", "silu_", "mish", "mish_", "sigmoid", "sigmoid_", "tanh",
    "tanh_", "hardtanh", "hardtanh_", "hardsigmoid", "hardsigmoid_", "hardswish",
    "hardswish_", "softplus", "softsign", "prelu", "_prelu_kernel", "rrelu", "glu",
    "logsigmoid", "threshold", "threshold_", "softmax", "_softmax", "log_softmax",
    "_log_softmax", "softmin", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max",
    "clamp_max_", "clip", "clip_",
    # regularisation and randomness (no seeding)
    "dropout", "dropout_", "feature_dropout", "feature_dropout_", "alpha_dropout",
    "alpha_dropout_", "feature_alpha_dropout", "native_dropout", "bernoulli", "bernoulli_",
    "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm",
    "normal", "normal_", "uniform_", "multinomial",
    # elementwise arithmetic and math
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "true_divide",
    "floor_divide", "floordiv", "remainder", "fmod", "neg", "neg_", "abs", "abs_", "sign",
    "sgn", "pow", "pow_", "square", "sqrt", "sqrt_", "rsqrt", "rsqrt_", "exp", "exp_", "exp2",
    "expm1", "log", "log_", "log2", "log10", "log1p", "reciprocal", "reciprocal_", "sin",
    "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh",
    "erf", "erfc", "erfinv", "floor", "ceil", "round", "trunc", "frac", "lerp", "addcmul",
    "addcdiv", "maximum", "minimum", "fmax", "fmin", "hypot", "logaddexp", "xlogy",
    "nan_to_num", "where", "masked_fill", "masked_fill_", "masked_select", "lt", "le", "gt",
    "ge", "eq", "ne", "logical_and", "logical_or", "logical_not", "logical_xor",
    "bitwise_and", "bitwise_or", "bitwise_not", "bitwise_xor", "__and__", "__or__",
    "__xor__", "__not__", "isnan", "isinf", "isfinite",
    # reductions
    "sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "prod", "std", "var",
    "var_mean", "std_mean", "logsumexp", "cumsum", "cumprod", "all", "any", "topk", "sort",
    "argsort", "count_nonzero",
    # shape, view, copy and creation
    "view", "_unsafe_view", "view_as", "reshape", "reshape_as", "flatten", "unflatten",
    "squeeze", "squeeze_", "unsqueeze", "unsqueeze_", "permute", "transpose", "transpose_",
    "contiguous", "expand", "expand_as", "expand_copy", "repeat", "repeat_interleave",
    "tile", "cat", "concat", "concatenate", "stack", "hstack", "vstack", "split",
    "split_with_sizes", "chunk", "unbind", "narrow", "select", "slice", "index",
    "index_select", "gather", "take_along_dim", "flip", "roll", "rot90", "movedim",
    "moveaxis", "swapaxes", "tril", "triu", "diagonal", "diag", "clone", "copy", "copy_",
    "detach", "detach_", "alias", "lift_fresh_copy", "to", "_to_copy", "type_as", "zero_",
    "fill_", "fill", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "empty",
    "empty_like", "empty_strided", "new_zeros", "new_ones", "new_full", "new_empty",
    "new_empty_strided", "arange", "linspace", "tensor", "scalar_tensor", "one_hot",
    "embedding", "index_put", "index_put_", "scatter", "scatter_add", "masked_scatter",
    "unfold", "meshgrid", "broadcast_tensors", "_assert_tensor_metadata",
    # scalars, lists and metadata of the graph's own values
    "size", "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "dim", "numel",
    "stride", "len", "__getitem__", "__contains__", "_set_item", "__is__", "__isnot__",
    "append", "extend", "insert", "pop", "list", "_unwrap_optional",
    "Int", "Float", "Bool", "ScalarImplicit", "IntImplicit", "FloatImplicit", "item",
    "is_floating_point", "is_complex", "is_grad_enabled", "is_autocast_enabled",
    "__range_length", "__derive_index", "format", "str", "__round_to_zero_floordiv",
    "mathremainder", "chr", "ord", "_assert_scalar", "sym_constrain_range",
    "sym_constrain_range_for_size", "_check_is_size",
})

# TorchScript's structural operators (``prim::``): constants, lists, tuples, attribute reads
# of the module's own parameters and submodules, control flow with checked bodies, casts.
# ``prim::RaiseException`` and ``aten::warn`` are checked where they are used: their message
# may be built from constants and tensor shapes only, never from a tensor's values.
PRIM: frozenset[str] = frozenset({
    "Constant", "ListConstruct", "ListUnpack", "TupleConstruct", "TupleUnpack",
    "TupleIndex", "TupleSlice", "DictConstruct", "GetAttr", "If", "Loop", "NumToTensor",
    "Uninitialized", "unchecked_cast", "device", "dtype", "layout", "is_cuda", "is_nested",
    "requires_grad", "type", "min", "max", "abs", "shape", "data", "AutogradZero",
    "isinstance", "RaiseException", "is_quantized", "is_meta", "is_sparse",
    "is_mkldnn", "is_xpu", "is_mps", "name", "index", "EnumValue", "EnumName",
})

# ``aten`` operators accepted only under a condition the checks name: a message built from
# constants and shapes, so that no value a model computes at run time leaves through them.
CONSTANT_MESSAGE_ONLY: frozenset[str] = frozenset({"warn", "_assert_async"})

# torch.export call targets outside ``torch.ops.aten``: symbolic-shape arithmetic.
EXPORT_PYTHON: frozenset[str] = frozenset({
    "_operator.getitem", "_operator.add", "_operator.sub", "_operator.mul",
    "_operator.floordiv", "_operator.truediv", "_operator.mod", "_operator.neg",
    "_operator.pow", "_operator.eq", "_operator.ne", "_operator.lt", "_operator.le",
    "_operator.gt", "_operator.ge", "_operator.and_", "_operator.or_", "_operator.not_",
    "torch.sym_int", "torch.sym_float", "torch.sym_max", "torch.sym_min", "torch.sym_not",
    "torch.sym_sqrt", "torch.sym_ite", "math.ceil", "math.floor", "math.trunc", "math.sqrt",
})

# Functions TorchScript source may call by bare name (builtins it compiles to the operators
# above). ``print``, ``fork``, ``wait``, ``getattr`` on modules and the rest are not here.
SCRIPT_BUILTINS: frozenset[str] = frozenset({
    "annotate", "unchecked_cast", "isinstance", "uninitialized", "int", "float", "bool",
    "str", "len", "range", "enumerate", "zip", "min", "max", "abs", "round", "divmod",
    "list", "tuple", "dict", "sorted", "all", "any", "sum", "ord", "chr", "pow", "hash",
})


def aten_allowed(name: str) -> bool:
    return name in ATEN


def prim_allowed(name: str) -> bool:
    return name in PRIM


def size() -> int:
    """How many operators the positive list names (aten, prim and the export extras)."""
    return len(ATEN | CONSTANT_MESSAGE_ONLY) + len(PRIM) + len(EXPORT_PYTHON)
