"""Base-3 digit extraction shared by the kernels: trit i of a byte without integer division."""

import triton
import triton.language as tl


@triton.jit
def byte_trit(b, digit):
    """Trit in {-1, 0, 1} at position `digit` (0..4) of byte values `b` (int32, <= 242).

    b // 3^digit is (b * ceil(2^16 / 3^digit)) >> 16, exact for b < 256; q % 3 by the constant 3.
    """
    magic = tl.where(digit == 0, 65536,
                     tl.where(digit == 1, 21846, tl.where(digit == 2, 7282, tl.where(digit == 3, 2428, 810))))
    q = (b * magic) >> 16
    return q % 3 - 1
