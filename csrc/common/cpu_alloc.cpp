#include "cpu_alloc.h"

#include <pthread.h>
#include <sys/mman.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

namespace reuse_core {
namespace {

constexpr int64_t kHuge = int64_t(2) << 20;       // 2 MiB
constexpr int64_t kMinBytes = int64_t(4) << 20;   // smaller tensors use ATen's allocator

struct Cache {
  std::mutex mu;
  std::multimap<int64_t, void*> free_blocks;  // size class -> aligned block of that many bytes
  int64_t cached = 0;
  int64_t limit = -1;

  int64_t limit_bytes() {
    if (limit < 0) {
      const char* env = std::getenv("REUSE_CORE_CPU_CACHE_MB");
      limit = (env ? std::atoll(env) : 1024) << 20;
    }
    return limit;
  }
};

Cache& cache();

// A fork (a DataLoader worker, say) while another thread holds the mutex would leave the child's
// copy locked for ever: hold it across fork, and release it on both sides.
void lock_for_fork() { cache().mu.lock(); }
void unlock_after_fork() { cache().mu.unlock(); }

Cache& cache() {
  static Cache* c = [] {
    auto* made = new Cache();  // never destroyed: deleters may run at interpreter exit
    pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork);
    return made;
  }();
  return *c;
}

// Sizes round up to one of four classes per power of two (x1, x1.25, x1.5, x1.75), in whole huge
// pages: at most 25% is wasted, and outputs whose shapes vary a little share blocks instead of
// filling the cache with blocks of sizes that never come back.
int64_t size_class(int64_t nbytes) {
  int64_t pages = (nbytes + kHuge - 1) / kHuge;
  int64_t top = 1;
  while (top * 2 <= pages) top *= 2;
  const int64_t step = top >= 4 ? top / 4 : 1;
  return (pages + step - 1) / step * step * kHuge;
}

void* map_block(int64_t bytes) {
  // Over-map by 2 MiB to align, then trim: the block is [aligned, aligned + bytes).
  const int64_t span = bytes + kHuge;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(raw != MAP_FAILED, "reuse_core: could not map ", bytes, " bytes for an output tensor");
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHuge - 1) & ~uintptr_t(kHuge - 1);
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t end = start + span, block_end = aligned + bytes;
  if (end > block_end) munmap(reinterpret_cast<void*>(block_end), end - block_end);
  madvise(reinterpret_cast<void*>(aligned), bytes, MADV_HUGEPAGE);
  return reinterpret_cast<void*>(aligned);
}

void release_block(void* p, int64_t bytes) {
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> g(c.mu);
    if (c.cached + bytes <= c.limit_bytes()) {
      c.free_blocks.emplace(bytes, p);
      c.cached += bytes;
      return;
    }
  }
  munmap(p, bytes);
}

void* acquire_block(int64_t bytes) {
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> g(c.mu);
    auto it = c.free_blocks.find(bytes);
    if (it != c.free_blocks.end()) {
      void* p = it->second;
      c.cached -= bytes;
      c.free_blocks.erase(it);
      return p;
    }
  }
  return map_block(bytes);
}

}  // namespace

at::Tensor empty_cpu_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const int64_t nbytes = numel * int64_t(at::elementSize(dtype));
  if (nbytes < kMinBytes) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  const int64_t bytes = size_class(nbytes);
  void* p = acquire_block(bytes);
  return at::from_blob(
      p, sizes, [bytes](void* q) { release_block(q, bytes); }, at::TensorOptions().dtype(dtype));
}

int64_t empty_cpu_cache() {
  std::multimap<int64_t, void*> blocks;
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> g(c.mu);
    blocks.swap(c.free_blocks);
    c.cached = 0;
  }
  int64_t freed = 0;
  for (const auto& [bytes, p] : blocks) {
    munmap(p, bytes);
    freed += bytes;
  }
  return freed;
}

}  // namespace reuse_core
