//! The operand checks and output shapes the GPU backends share: what each op accepts, decided on
//! dimensions alone, so that wgpu and CUDA refuse the same inputs with the same words. (The CPU
//! backend's checks are candle's and its kernels'.)

use crate::device::packed;
use crate::{DType, Error, Result};

fn bad(op: &'static str, reason: String) -> Error {
    Error::BadOperands { op, reason }
}

/// The row width of a norm over `x`, with an optional residual of `x`'s shape and a
/// `[width]` gamma.
pub(crate) fn norm(
    op: &'static str,
    x: &[usize],
    residual: Option<&[usize]>,
    gamma: &[usize],
) -> Result<usize> {
    let width = *x.last().unwrap_or(&0);
    if width == 0 || residual.is_some_and(|r| r != x) || gamma != [width] {
        return Err(bad(op, format!("x {x:?}, gamma {gamma:?}")));
    }
    Ok(width)
}

/// `(tokens, width, head_dim)` of a packed encoder batch's stacked `qkv` (heads of at most 256).
pub(crate) fn encoder_attention(
    qkv: &[usize],
    lengths: &[usize],
    heads: usize,
) -> Result<(usize, usize, usize)> {
    let [tokens, width3] = qkv[..] else {
        return Err(bad(
            "attention",
            format!("qkv {qkv:?} is not [tokens, 3 * width]"),
        ));
    };
    if heads == 0 || !packed(lengths, tokens) || width3 % (3 * heads) != 0 || width3 / 3 / heads > 256 {
        return Err(bad(
            "attention",
            format!("qkv {qkv:?}, lengths {lengths:?}, {heads} heads"),
        ));
    }
    Ok((tokens, width3 / 3, width3 / 3 / heads))
}

/// Where each sequence of a packed batch starts, and where the last one ends (`batch + 1` rows).
pub(crate) fn starts(lengths: &[usize]) -> Vec<u32> {
    std::iter::once(0)
        .chain(lengths.iter().scan(0, |at, &n| {
            *at += n;
            Some(*at)
        }))
        .map(|r| r as u32)
        .collect()
}

/// The output shape of SwiGLU over `x`: the last dimension halved.
pub(crate) fn swiglu(x: &[usize]) -> Result<Vec<usize>> {
    let width = *x.last().unwrap_or(&0);
    if !width.is_multiple_of(2) {
        return Err(bad("swiglu", format!("odd width {width}")));
    }
    let mut dims = x.to_vec();
    *dims.last_mut().expect("has a last dim") = width / 2;
    Ok(dims)
}

/// `(rows, width, output shape)` of gathering rows of a `[rows, width]` table by u32 ids.
pub(crate) fn embedding(
    table: &[usize],
    ids: &[usize],
    ids_dtype: DType,
) -> Result<(usize, usize, Vec<usize>)> {
    let [rows, width] = table[..] else {
        return Err(bad("embedding", format!("table {table:?} is not a matrix")));
    };
    if ids_dtype != DType::U32 {
        return Err(bad("embedding", format!("ids are {ids_dtype:?}, not u32")));
    }
    let mut dims = ids.to_vec();
    dims.push(width);
    Ok((rows, width, dims))
}

/// The row width of mean pooling a packed `[tokens, width]` batch.
pub(crate) fn mean_pool(hidden: &[usize], lengths: &[usize]) -> Result<usize> {
    let [tokens, width] = hidden[..] else {
        return Err(bad(
            "mean_pool",
            format!("hidden {hidden:?} is not [tokens, dim]"),
        ));
    };
    if !packed(lengths, tokens) {
        return Err(bad(
            "mean_pool",
            format!("hidden {hidden:?}, lengths {lengths:?}"),
        ));
    }
    Ok(width)
}

/// The row width of an L2 normalization over `x`.
pub(crate) fn l2_normalize(x: &[usize]) -> Result<usize> {
    match x.last() {
        Some(&width) if width > 0 => Ok(width),
        _ => Err(bad("l2_normalize", format!("x {x:?}"))),
    }
}

/// Whether `b` broadcasts over the leading dimensions of `a`: its shape, without leading 1s,
/// ends `a`'s.
pub(crate) fn broadcast(a: &[usize], b: &[usize]) -> Result<()> {
    let trimmed: Vec<usize> = b.iter().copied().skip_while(|&d| d == 1).collect();
    if b.iter().product::<usize>() == 0 || !a.ends_with(&trimmed) {
        return Err(bad("add", format!("cannot broadcast {b:?} onto {a:?}")));
    }
    Ok(())
}

/// The shape of rows `start..start + len` of `x`.
pub(crate) fn rows(x: &[usize], start: usize, len: usize) -> Result<Vec<usize>> {
    if x.is_empty() || start + len > x[0] {
        return Err(bad("rows", format!("rows {start}..{} of {x:?}", start + len)));
    }
    let mut dims = x.to_vec();
    dims[0] = len;
    Ok(dims)
}

/// The shape of `parts` one after another along the first dimension (same row shape and dtype).
pub(crate) fn concat_rows(parts: &[(&[usize], DType)]) -> Result<Vec<usize>> {
    let &(first, dtype) = parts
        .first()
        .ok_or_else(|| bad("concat_rows", "nothing to concatenate".into()))?;
    if first.is_empty()
        || parts
            .iter()
            .any(|(d, t)| d.get(1..) != first.get(1..) || *t != dtype)
    {
        return Err(bad("concat_rows", "parts differ in row shape".into()));
    }
    let mut dims = first.to_vec();
    dims[0] = parts.iter().map(|(d, _)| d[0]).sum();
    Ok(dims)
}

/// A host tensor's values as a GPU buffer holds them: u32 as they are, anything else as f32.
pub(crate) enum HostValues {
    U32(Vec<u32>),
    F32(Vec<f32>),
}

impl HostValues {
    pub(crate) fn of(host: &candle_core::Tensor) -> Result<Self> {
        let flat = host.flatten_all()?;
        Ok(match host.dtype() {
            DType::U32 => HostValues::U32(flat.to_vec1()?),
            _ => HostValues::F32(flat.to_dtype(DType::F32)?.to_vec1()?),
        })
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            HostValues::U32(v) => bytemuck::cast_slice(v),
            HostValues::F32(v) => bytemuck::cast_slice(v),
        }
    }

    pub(crate) fn dtype(&self) -> DType {
        match self {
            HostValues::U32(_) => DType::U32,
            HostValues::F32(_) => DType::F32,
        }
    }
}
