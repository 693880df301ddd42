"""The on-disk contract of a ptqtp checkpoint, declared once and read everywhere else.

Imports nothing from ptqtp. Every other module takes tensor suffixes, sizes and version numbers from here.

Storage of one quantized Linear `X` with weight (out, in) and group size g (G = ceil(in / g) groups)::

    X.weight        uint8   (2, out, ceil(in / 5))   plane p, row r: base-3 digits, 5 trits per byte
    X.weight_scale  float16 (2, out, G)              scale of plane p for (row r, group j)
    X.bias          as stored by the original model (only if the Linear has one)

A byte holds the trits t0..t4 of 5 consecutive input columns 5k..5k+4 as digits d = t + 1 in {0, 1, 2}::

    byte = d0 + 3*d1 + 9*d2 + 27*d3 + 81*d4        (<= 242, so it fits in a uint8: 3^5 = 243 <= 256)

The last byte of a row is padded with trit 0 (digit 1) when in % 5 != 0; padding exists only in the bytes,
never in the maths: group j covers columns [j*g, min((j+1)*g, in)). Bytes run along the input dimension
across group boundaries (a byte may hold columns of two groups), which keeps storage at exactly 1.6 bits
per trit; kernels that want group-aligned or 2-bit fields convert once at load time.

The weight is  W[r, c] = scale[0, r, c // g] * T0[r, c] + scale[1, r, c // g] * T1[r, c].

The packed tensor is 3-D on purpose: its shape can never equal a dense (out, in) weight, so a plain
transformers load without `import ptqtp` fails with a size mismatch instead of random-initialising.
Mixture-of-experts models. Checkpoints that store experts per expert (Mixtral's
`...experts.N.w1.weight`, Qwen-MoE's `...experts.N.gate_proj.weight`, as transformers 5 `save_pretrained` writes
them) keep that layout: every expert projection is a Linear `X` as above. A checkpoint that stores a fused
3-D tensor `P` (E, out, in) gets one per expert, stacked, beside it::

    P         uint8   (E, 2, out, ceil(in / 5))
    P_scale   float16 (E, 2, out, G)

In memory (`TritPlaneExperts`, not a storage format), transformers 5 holds experts fused; the module keeps each
fused projection `P` made of `blocks` row blocks (2 for `gate_up_proj` built from separate gate and up Linears,
1 otherwise) as `P` uint8 (E, 2 * blocks, out / blocks, ceil(in / 5)) and `P_scale` float16
(E, 2 * blocks, out / blocks, G): planes [e, 2k:2k+2] are block k of expert e, each exactly a Linear's
(2, rows, ceil(in / 5)). That is what transformers' MoE converters (stack per expert on dim 0, concatenate on
dim 1) make of per-expert tensors, and what they split back on `save_pretrained`.

At group size 128: 2 * 8 / 5 = 3.2 bits of trits + 2 * 16 / 128 = 0.25 bits of scales = 3.45 bits/weight.

Sharding (tensor parallelism; `integrations/sharding.py`, used by the vLLM plugin): a rank that owns output rows
(q/k/v, gate/up, column-parallel) takes a plain slice of dimension 1 of `X.weight` and `X.weight_scale`. A rank
that owns input columns (o_proj, down_proj: row-parallel) cannot slice the bytes: rank r of tp owns columns
[r * in / tp, (r + 1) * in / tp), and its first column starts a byte only when it is a multiple of 5, never for
power-of-two sizes (4096 / 2 = 2048 = 5 * 409 + 3). Readers re-slice instead: unpack the bytes that hold the
rank's columns, cut, pack again; scales are sliced by whole groups, so `in / tp` must be a multiple of the group
size, and a split that cuts a group is refused. Version 1 stays as it is: a group-aligned packing (26 bytes per
128 columns, 3.5 bits/weight) would turn the re-slice into a byte slice, but the re-slice costs a fraction of a
second per layer once at load (measured in eval/VLLM.md) and no run-time cost.
"""

from __future__ import annotations

import math

QUANT_METHOD = "ptqtp"
FORMAT_VERSION = 1
PACKING = "base3-5"
SCALE_DTYPE_NAME = "float16"
TRITS_PER_BYTE = 5
NUM_PLANES = 2
DEFAULT_GROUP_SIZE = 128

WEIGHT_SUFFIX = "weight"  # the packed planes, uint8
SCALE_SUFFIX = "weight_scale"  # the two scales per (row, group), float16
BIAS_SUFFIX = "bias"

# safetensors metadata keys written into every shard ptqtp produces
META_FORMAT = "format"  # "pt", as transformers expects
META_QUANT_METHOD = "quant_method"
META_FORMAT_VERSION = "ptqtp_format_version"

# powers of three used by the digit layout above, least significant first
DIGIT_WEIGHTS = (1, 3, 9, 27, 81)


def packed_cols(in_features: int) -> int:
    """Bytes per row and plane for `in_features` trits."""
    return math.ceil(in_features / TRITS_PER_BYTE)


def num_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def packed_shape(out_features: int, in_features: int) -> tuple[int, int, int]:
    return (NUM_PLANES, out_features, packed_cols(in_features))


def scale_shape(out_features: int, in_features: int, group_size: int) -> tuple[int, int, int]:
    return (NUM_PLANES, out_features, num_groups(in_features, group_size))


def bits_per_weight(out_features: int, in_features: int, group_size: int) -> float:
    """Stored bits per weight of one Linear (planes + fp16 scales, bias excluded)."""
    plane_bytes = NUM_PLANES * out_features * packed_cols(in_features)
    scale_bytes = 2 * NUM_PLANES * out_features * num_groups(in_features, group_size)
    return 8.0 * (plane_bytes + scale_bytes) / (out_features * in_features)
