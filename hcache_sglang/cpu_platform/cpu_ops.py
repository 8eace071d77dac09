"""Pure-torch versions of the ``sgl_kernel`` ops SGLang's CPU engine calls.

SGLang calls these under the ``sgl_kernel`` names when ``SGLANG_USE_CPU_ENGINE=1``;
the stand-in module (:mod:`hcache_sglang.cpu_platform.standins`) binds them:

- ``sgl_kernel.assign_req_to_token_pool_cpu`` -> :func:`assign_req_to_token_pool`
  (every extend/decode batch writes its new KV slots into ``req_to_token``);
- ``sgl_kernel.copy_all_layer_kv_cache_cpu`` -> :func:`copy_all_layer_kv_cache`
  (move KV slots inside the device pool, every layer);
- ``sgl_kernel.kvcacheio.transfer_kv_direct`` -> :func:`transfer_kv_direct`
  (HiCache host <-> device pages, ``--hicache-io-backend direct``, layer_first);
- ``transfer_kv_all_layer_direct_lf_pf`` / ``transfer_kv_per_layer_direct_pf_lf`` ->
  :func:`transfer_kv_all_layer_direct_lf_pf` / :func:`transfer_kv_per_layer_direct_pf_lf`
  (the same with the ``page_first_direct`` host layout, which HiCache's Mooncake backend asks for).

Signatures follow sgl_kernel's (keyword names included): SGLang is the caller.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch


def assign_req_to_token_pool(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    max_len: int,
) -> None:
    """Write each request's new KV slots into its ``req_to_token`` row.

    req_pool_indices: [batch]; req_to_token: [max_reqs, max_len] (mutated);
    start_offset, end_offset: [batch], token positions; out_cache_loc:
    [sum(end - start)], the new slots of all requests back to back.
    """
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    cursor = 0
    for row, start, end in zip(rows, starts, ends):
        if not 0 <= start <= end <= max_len:
            raise ValueError(
                f"assign_req_to_token_pool: request row {row} has offsets [{start}, {end}); "
                f"expected 0 <= start <= end <= max_len={max_len}"
            )
        n = end - start
        req_to_token[row, start:end] = out_cache_loc[cursor : cursor + n].to(req_to_token.dtype)
        cursor += n


def copy_all_layer_kv_cache(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """Copy slot ``src_loc[i]`` onto slot ``tgt_loc[i]`` in every pool buffer.

    data_ptrs: [num_buffers] uint64 base addresses of contiguous CPU buffers
    ``[num_slots, ...]``; strides: [num_buffers] bytes per slot (also the copy
    width); tgt_loc, src_loc: [n] slot indices. Same contract as the Triton kernel
    ``copy_all_layer_kv_cache_tiled`` in ``sglang/kernels/ops/kvcache/cache_move.py``.
    """
    if tgt_loc.shape != src_loc.shape:
        raise ValueError(
            f"copy_all_layer_kv_cache: tgt_loc {tuple(tgt_loc.shape)} and src_loc "
            f"{tuple(src_loc.shape)} must have the same shape"
        )
    pairs = list(zip(tgt_loc.tolist(), src_loc.tolist()))
    for base, stride in zip(data_ptrs.tolist(), strides.tolist()):
        for tgt, src in pairs:
            if tgt != src:
                ctypes.memmove(base + tgt * stride, base + src * stride, stride)


def transfer_kv_direct(
    src_layers: Sequence[torch.Tensor],
    dst_layers: Sequence[torch.Tensor],
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    page_size: int,
) -> None:
    """Copy rows ``src_indices`` of each source layer to rows ``dst_indices`` of its destination.

    src_layers[i]: [num_src_slots, num_kv_heads, head_dim]; dst_layers[i]:
    [num_dst_slots, num_kv_heads, head_dim] (mutated); src_indices, dst_indices:
    [n] token slots, n a multiple of ``page_size`` (whole pages move).
    """
    if len(src_layers) != len(dst_layers):
        raise ValueError(
            f"transfer_kv_direct: {len(src_layers)} source layers but {len(dst_layers)} "
            "destination layers; expected one destination per source"
        )
    _check_pages(src_indices, dst_indices, page_size, "transfer_kv_direct")
    src = src_indices.long()
    dst = dst_indices.long()
    for src_layer, dst_layer in zip(src_layers, dst_layers):
        rows = src_layer[src.to(src_layer.device)]
        dst_layer[dst.to(dst_layer.device)] = rows.to(dst_layer.device)


def _check_pages(src_indices: torch.Tensor, dst_indices: torch.Tensor, page_size: int, what: str) -> None:
    """Both index lists the same length, a whole number of pages of ``page_size``."""
    if src_indices.numel() != dst_indices.numel():
        raise ValueError(f"{what}: {src_indices.numel()} source indices but {dst_indices.numel()} "
                         "destination indices; expected equal counts")
    if page_size <= 0 or src_indices.numel() % page_size:
        raise ValueError(f"{what}: {src_indices.numel()} indices is not a whole number of pages of "
                         f"page_size={page_size}")


def _page_first_pairs(src_indices, dst_indices, page_size, what):
    """The first token slot of each page, of the source and of the destination (checked pages)."""
    _check_pages(src_indices, dst_indices, page_size, what)
    return tuple(i.long().view(-1, page_size)[:, 0].cpu() for i in (src_indices, dst_indices))


def transfer_kv_all_layer_direct_lf_pf(
    src_ptrs: Sequence[torch.Tensor],
    dst_ptrs: Sequence[torch.Tensor],
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    page_size: int,
) -> None:
    """Device pages (layer-first) into host pages (page-first), every layer.

    src_ptrs: the device layers, ``[k_0 .. k_{L-1}, v_0 .. v_{L-1}]`` (``[k_0 .. k_{L-1}]`` for
    MLA), each ``[slots, heads, head_dim]``; dst_ptrs: ``[host_k, host_v]`` (``[host]`` for MLA),
    each ``[pages, L, page_size, heads, head_dim]`` (mutated). A page's tokens sit in consecutive
    device slots from its first slot; host page = its first host slot // page_size.
    """
    src, dst = _page_first_pairs(src_indices, dst_indices, page_size, "transfer_kv_all_layer_direct_lf_pf")
    per_kind = len(src_ptrs) // len(dst_ptrs)
    rows = (src[:, None] + torch.arange(page_size)).reshape(-1)
    dst_pages = dst // page_size
    for kind, host in enumerate(dst_ptrs):
        for layer in range(per_kind):
            device = src_ptrs[kind * per_kind + layer]
            pages = device[rows.to(device.device)].view(len(src), page_size, *device.shape[1:])
            host[dst_pages.to(host.device), layer] = pages.to(host.device)


def transfer_kv_per_layer_direct_pf_lf(
    src_ptrs: Sequence[torch.Tensor],
    dst_ptrs: Sequence[torch.Tensor],
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    layer_id: int,
    page_size: int,
) -> None:
    """Host pages (page-first) of layer ``layer_id`` into device pages (layer-first): the inverse
    of :func:`transfer_kv_all_layer_direct_lf_pf` for the layers ``dst_ptrs`` holds
    (``[device_k, device_v]``, or one for MLA), starting at ``layer_id``."""
    src, dst = _page_first_pairs(src_indices, dst_indices, page_size, "transfer_kv_per_layer_direct_pf_lf")
    per_kind = len(dst_ptrs) // len(src_ptrs)
    rows = (dst[:, None] + torch.arange(page_size)).reshape(-1)
    src_pages = src // page_size
    for kind, host in enumerate(src_ptrs):
        for layer in range(per_kind):
            device = dst_ptrs[kind * per_kind + layer]
            pages = host[src_pages.to(host.device), layer_id + layer]
            device[rows.to(device.device)] = pages.reshape(-1, *device.shape[1:]).to(device.device)
