"""Exact SDPA stand-ins for the flash-attention kernels, so that transformers' own flash
code path (`_flash_attention_forward`: unpadding, varlen from position_ids or
cu_seq_lens) runs on CPU. Only the two kernels are replaced; everything that decides
which tokens attend to which is transformers' code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

IMPL = "flash_attention_2"


def _sdpa(q, k, v, causal, scale):
    # [T, H, D] -> [1, H, T, D]; grouped-query heads repeated as flash does.
    q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return out[0].transpose(0, 1)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
    """[B, T, H, D] batches, each row attended whole."""
    return torch.stack([_sdpa(q[b], k[b], v[b], causal, softmax_scale)
                        for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                           max_seqlen_k=None, dropout_p=0.0, softmax_scale=None,
                           causal=False, **_):
    """[total, H, D] tokens; sequence i is rows cu_seqlens[i]:cu_seqlens[i+1]."""
    outs = []
    for i in range(len(cu_seqlens_q) - 1):
        qs = slice(int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]))
        ks = slice(int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1]))
        outs.append(_sdpa(q[qs], k[ks], v[ks], causal, softmax_scale))
    return torch.cat(outs)


@contextlib.contextmanager
def sdpa_flash_kernels() -> Iterator[None]:
    """transformers' flash path with the stand-in kernels, for models whose config says
    flash_attention_2."""
    from transformers import modeling_flash_attention_utils as fa

    names = ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn",
             "_flash_with_kvcache_fn", "_pad_fn", "_unpad_fn", "_process_flash_kwargs_fn",
             "_process_with_kvcache_kwargs_fn")
    saved = {n: getattr(fa, n) for n in names}
    fa._loaded_implementation = IMPL
    fa._flash_fn, fa._flash_varlen_fn = flash_attn_func, flash_attn_varlen_func
    fa._flash_with_kvcache_fn = None
    fa._pad_fn, fa._unpad_fn = fa._pad_input, fa._unpad_input
    fa._process_flash_kwargs_fn = fa._lazy_define_process_function(flash_attn_varlen_func)
    fa._process_with_kvcache_kwargs_fn = dict
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(fa, n, v)
