"""A frozen base stored quantized (ModelConfig.quant): QLoRA's NF4 with double-quantized scales, or int8.

nf4: each block of 64 consecutive weights along a kernel's input axis is scaled by its absolute maximum and
rounded to the nearest of the 16 NormalFloat values QLoRA published (Dettmers et al. 2023, appendix E; the
`NF4` table below), two 4-bit codes packed per byte. The block scales are quantized again ("double
quantization"): less their mean (one per kernel), in blocks of 256 along the output axis (one block per row of
scales where the output width is not a multiple of 256), each scaled by its absolute maximum to int8. About 4.13
bits per weight. bitsandbytes stores the second-level scales with its dynamic 8-bit map instead of int8.

int8: absmax per output channel (over the input axis), weights rounded to int8.

Every array keeps the kernel's two trailing axes [in, out] (leading axes: stacked layers), so the quantized
arrays take the kernel's logical axes and split over the mesh as it does. `dequantize` gives the kernel back in
the compute dtype inside each matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

KINDS = ("none", "int8", "nf4")
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
BLOCK = 64  # weights per first-level scale
SCALE_BLOCK = 256  # first-level scales per second-level scale


class Quantized(nnx.Variable):
    """An array of a quantized kernel: frozen (no gradient, no optimizer state), placed by its `axes`."""


def supported(kind: str, d_in: int) -> bool:
    """Whether a kernel with `d_in` inputs can be stored as `kind`: int8 always, nf4 when BLOCK divides d_in.

    Args:
        kind: "int8" or "nf4" (any other value gives False).
        d_in: The kernel's input width.

    Returns:
        True when the kernel can be quantized as `kind`.
    """
    return kind == "int8" or (kind == "nf4" and d_in % BLOCK == 0)


def scale_block(d_out: int) -> int:
    """First-level scales per second-level scale along the output axis for an nf4 kernel.

    Args:
        d_out: The kernel's output width.

    Returns:
        SCALE_BLOCK when it divides d_out, else d_out (one block per row of scales).
    """
    return SCALE_BLOCK if d_out % SCALE_BLOCK == 0 else d_out


def _safe(x):
    return jnp.where(x == 0, 1.0, x)


def quantize(kind: str, w) -> dict[str, jax.Array]:
    """The arrays of `w` [..., in, out] quantized as `kind` (int8 | nf4).

    Args:
        kind: "int8", or "nf4" (then BLOCK must divide `in`).
        w: The kernel, [..., in, out], any float dtype (computed in float32).

    Returns:
        int8: "q" int8 [..., in, out] and "scale" float32 [..., out]. nf4: "codes" uint8 [..., in / 2, out]
        (two codes per byte), "scales_q" int8 [..., in / 64, out], "scales_scale" float32
        [..., in / 64, out / scale_block(out)] and "scales_mean" float32 [...].
    """
    w = jnp.asarray(w, jnp.float32)
    *lead, d_in, d_out = w.shape
    if kind == "int8":
        scale = jnp.max(jnp.abs(w), axis=-2)  # [..., out]
        return {"q": jnp.round(w / _safe(scale)[..., None, :] * 127).astype(jnp.int8), "scale": scale}
    blocks = w.reshape(*lead, d_in // BLOCK, BLOCK, d_out)
    absmax = jnp.max(jnp.abs(blocks), axis=-2)  # [..., in / 64, out]
    normed = blocks / _safe(absmax)[..., None, :]
    # the nearest code: how many midpoints between neighbouring codes lie below the value (no [.., 16] temporary)
    mids = (NF4[1:] + NF4[:-1]) / 2
    codes = jnp.zeros(normed.shape, jnp.uint8)
    for m in mids:
        codes = codes + (normed > m).astype(jnp.uint8)
    codes = codes.reshape(*lead, d_in, d_out)
    packed = (codes[..., 0::2, :] << 4) | codes[..., 1::2, :]  # [..., in / 2, out]
    mean = jnp.mean(absmax, axis=(-2, -1))  # [...]
    b2 = scale_block(d_out)
    centred = (absmax - mean[..., None, None]).reshape(*lead, d_in // BLOCK, d_out // b2, b2)
    scale2 = jnp.max(jnp.abs(centred), axis=-1)  # [..., in / 64, out / b2]
    q = jnp.round(centred / _safe(scale2)[..., None] * 127).astype(jnp.int8).reshape(absmax.shape)
    return {"codes": packed, "scales_q": q, "scales_scale": scale2, "scales_mean": mean}


def dequantize(kind: str, arrays: dict, dtype) -> jax.Array:
    """The kernel [..., in, out] in `dtype` from quantize()'s arrays.

    Args:
        kind: "int8" or "nf4", as the arrays were made.
        arrays: quantize()'s dict of arrays.
        dtype: The dtype of the result.

    Returns:
        The kernel, [..., in, out].
    """
    if kind == "int8":
        return (arrays["q"].astype(jnp.float32) * (arrays["scale"] / 127)[..., None, :]).astype(dtype)
    packed, q = arrays["codes"], arrays["scales_q"]
    *lead, half, d_out = packed.shape
    b2 = scale_block(d_out)
    absmax = (q.astype(jnp.float32).reshape(*q.shape[:-1], d_out // b2, b2) / 127
              * arrays["scales_scale"][..., None]).reshape(q.shape) + arrays["scales_mean"][..., None, None]
    codes = jnp.stack([packed >> 4, packed & 15], axis=-2).reshape(*lead, 2 * half, d_out)
    values = jnp.asarray(NF4)[codes].reshape(*lead, 2 * half // BLOCK, BLOCK, d_out)
    return (values * absmax[..., None, :]).reshape(*lead, 2 * half, d_out).astype(dtype)


def array_axes(kind: str, kernel_axes: tuple) -> dict[str, tuple]:
    """Logical axes of each quantized array, from the kernel's ([LAYERS,] in, out).

    Args:
        kind: "int8" or "nf4".
        kernel_axes: The kernel's logical axis names.

    Returns:
        A dict of array name (as quantize() names them) -> its logical axes.
    """
    *lead, in_axis, out_axis = kernel_axes
    if kind == "int8":
        return {"q": kernel_axes, "scale": (*lead, out_axis)}
    return {"codes": kernel_axes, "scales_q": kernel_axes, "scales_scale": kernel_axes, "scales_mean": tuple(lead)}


# One call in a trace: under nnx.eval_shape (plan's abstract model) each of quantize's ops would be an equation
# that every later RNG draw of the model's construction walks, quadratic in the model's kernels.
_quantize = jax.jit(quantize, static_argnums=0)


class QuantizedKernel(nnx.Module):
    """A frozen kernel [..., in, out] held quantized; `dequantize(dtype)` gives it back for a matmul.

    Args:
        kind: "int8" or "nf4".
        kernel: The full-precision kernel, [..., in, out].
        axes: The kernel's logical axis names.
    """

    def __init__(self, kind: str, kernel, axes: tuple):
        self.kind = kind
        arrays, names = _quantize(kind, kernel), array_axes(kind, tuple(axes))
        for name, value in arrays.items():
            setattr(self, name, Quantized(value, axes=names[name]))

    @property
    def main(self) -> Quantized:
        """The array with the kernel's shape (codes: half its input axis)."""
        return self.codes if self.kind == "nf4" else self.q

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, rows, cols = self.main.shape
        return (*lead, rows * (2 if self.kind == "nf4" else 1), cols)

    def set_from(self, kernel, shardings: dict | None = None) -> None:
        """Quantizes `kernel` into this module's arrays (each onto its sharding, when given).

        Args:
            kernel: The full-precision kernel, [..., in, out], of this module's shape.
            shardings: Array name -> jax Sharding for each array, or None to let jax place them.
        """
        fn = jax.jit(lambda w: quantize(self.kind, w), out_shardings=shardings)
        for name, value in fn(kernel).items():
            getattr(self, name).set_value(value)

    def arrays_names(self) -> tuple[str, ...]:
        """The names of this kind's quantized arrays."""
        return tuple(array_axes(self.kind, ("in", "out")))

    def arrays(self) -> dict:
        """Array name -> the current value of each quantized array."""
        return {name: getattr(self, name)[...] for name in self.arrays_names()}

    def dequantize(self, dtype) -> jax.Array:
        """The kernel [..., in, out] in `dtype` (see the module-level `dequantize`)."""
        return dequantize(self.kind, self.arrays(), dtype)
