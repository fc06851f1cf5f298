// Output buffers for the CPU kernels.
//
// A large freshly allocated tensor costs more in page faults than the fused kernels spend on
// arithmetic (KERNEL_NOTES.md: ~95 ms of faults for a 131 MB gradient at 4 KiB pages). Large
// buffers therefore come from 2 MiB-aligned mappings advised for transparent huge pages, and
// freed ones are kept in a small cache by size class (REUSE_CORE_CPU_CACHE_MB, default 1024;
// 0 turns the cache off) so a training loop reuses the pages it already faulted in. A block is
// only handed out again after its tensor's storage has been freed, so nothing aliases. The cache
// survives fork (pthread_atfork) and empty_cpu_cache() gives its memory back.
#pragma once

#include <ATen/ATen.h>

namespace reuse_core {

at::Tensor empty_cpu_output(at::IntArrayRef sizes, at::ScalarType dtype);

// Unmaps every cached block (none is in use: in-use blocks are not in the cache); returns the bytes.
int64_t empty_cpu_cache();

}  // namespace reuse_core
