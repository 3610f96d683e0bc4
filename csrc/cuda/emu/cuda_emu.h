// CUDA device emulation: compiles qgait's real .cu sources as host C++ (g++ / clang++) and runs
// their kernels on the CPU, so that tests can execute every kernel without a GPU (under
// AddressSanitizer + UBSan, or ThreadSanitizer). docs/cuda_emulation.md says how to use it and
// what it cannot see. The .cu files reach this header through the stand-ins in emu/include/
// (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h) when built with -DQGAIT_CUDA_EMU.
//
// Model:
//  * a launch runs its blocks one after the other, so `__shared__` can be plain static storage
//    (one block lives at a time); each CUDA thread of a block is a fiber on one host thread
//    (default: fast, deterministic schedule) or a host thread from a persistent pool (TSan
//    builds, where data races between CUDA threads are real races that TSan reports); see
//    "Two ways to run the CUDA threads of a block" below;
//  * `__syncthreads` is a barrier over the block's live threads (a thread that returned no
//    longer counts, as on sm_70+); warp shuffles go through a per-warp buffer and barrier, and a
//    full-mask shuffle in a warp that is not full (partial block, exited lane) aborts;
//  * static `__shared__` arrays live in one linker section that is filled with garbage before
//    every block, and the dynamic (`extern __shared__`) buffer is a per-launch heap block of
//    exactly the requested size, also filled with garbage: uninitialised reads give NaN / -1,
//    overruns are ASan reports;
//  * a launch checks the hardware limits and fails as CUDA does (cudaGetLastError): at most
//    1024 threads per block (x, y <= 1024, z <= 64), grid x < 2^31, grid y / z <= 65535,
//    dynamic shared memory <= 48 KiB unless cudaFuncSetAttribute raised it (to at most sm_80's
//    163 KiB);
//  * a device-side assert prints CUDA's message and makes the context unusable (every later
//    launch and cudaGetLastError report cudaErrorAssert), without killing the process;
//  * arithmetic is the host's IEEE arithmetic: build with -ffp-contract=off so that nothing is
//    fused that the device would not fuse.
#pragma once
#ifndef QGAIT_CUDA_EMU
#error "cuda_emu.h is the CPU emulation of CUDA: build with -DQGAIT_CUDA_EMU"
#endif

#include <atomic>
#include <cassert>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>

// ---- qualifiers --------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __constant__ static
// Static shared arrays: one section, refilled with garbage before each block (see above).
#define __shared__ static __attribute__((section("qgait_emu_shared"), used))

// ---- runtime types -----------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
// CUDA's 16-byte vector type: its alignment makes a misaligned vector access a UBSan report,
// as it is a "misaligned address" fault on the device.
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorAssert = 710,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

namespace qgait_emu {

constexpr size_t kDefaultDynSmem = 48 * 1024;  // without cudaFuncSetAttribute
constexpr size_t kMaxDynSmemOptIn = 163 * 1024;  // sm_80 (sm_90: 227 KiB)

[[noreturn]] inline void die(const char* what, const char* detail = "") {
  std::fprintf(stderr, "qgait CUDA emulation: %s%s\n", what, detail);
  std::fflush(stderr);
  std::abort();
}

// Two ways to run the CUDA threads of a block (chosen at compile time):
//  * fibers (default): one host thread runs every CUDA thread of the block as a ucontext
//    fiber, switching only at barriers and shuffles, in a pseudo-random order that changes
//    from block to block. Fast (a switch costs ~0.1 us) and deterministic: a missing barrier
//    lets a thread read what a later-scheduled thread has not written yet (garbage), run after
//    run. A barrier that not every live thread reaches is reported as a deadlock.
//  * threads (QGAIT_EMU_THREADS, implied by ThreadSanitizer): one host thread per CUDA
//    thread from a persistent pool, so that a missing barrier is a data race TSan reports.
#if defined(__SANITIZE_THREAD__) || defined(QGAIT_EMU_THREADS)
#define QGAIT_EMU_USE_THREADS 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define QGAIT_EMU_USE_THREADS 1
#endif
#endif
#ifndef QGAIT_EMU_USE_THREADS
#define QGAIT_EMU_USE_THREADS 0
#endif

#if QGAIT_EMU_USE_THREADS
// A barrier over a set of threads that may shrink (a thread leaves when it returns).
class Barrier {
 public:
  void reset(int n) {
    std::lock_guard<std::mutex> g(m_);
    live_ = n;
    arrived_ = 0;
  }
  void wait() {
    std::unique_lock<std::mutex> g(m_);
    const uint64_t gen = gen_;
    if (++arrived_ >= live_) {
      release();
    } else {
      cv_.wait(g, [&] { return gen_ != gen; });
    }
  }
  void leave() {
    std::lock_guard<std::mutex> g(m_);
    --live_;
    if (arrived_ > 0 && arrived_ >= live_) release();
  }
  int live() {
    std::lock_guard<std::mutex> g(m_);
    return live_;
  }

 private:
  void release() {
    arrived_ = 0;
    ++gen_;
    cv_.notify_all();
  }
  std::mutex m_;
  std::condition_variable cv_;
  int live_ = 0, arrived_ = 0;
  uint64_t gen_ = 0;
};
#else
class Barrier;
void fiber_block_on(Barrier* b, uint64_t gen);  // yields until b's generation moves on
// The same barrier for fibers: one host thread, so no locks; a waiter yields to the scheduler.
class Barrier {
 public:
  void reset(int n) {
    live_ = n;
    arrived_ = 0;
  }
  void wait() {
    const uint64_t gen = gen_;
    if (++arrived_ >= live_) {
      release();
    } else {
      fiber_block_on(this, gen);
    }
  }
  void leave() {
    --live_;
    if (arrived_ > 0 && arrived_ >= live_) release();
  }
  int live() const { return live_; }
  uint64_t gen() const { return gen_; }

 private:
  void release() {
    arrived_ = 0;
    ++gen_;
  }
  int live_ = 0, arrived_ = 0;
  uint64_t gen_ = 0;
};
#endif

struct Warp {
  Barrier bar;
  int size = 32;  // lanes launched in this warp
  alignas(8) unsigned char slot[32][8];
};

struct Block {
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
};

// Per-CUDA-thread state (set by the worker that runs it).
struct ThreadCtx {
  int tid = -1;  // linear thread index in the block
  Block* block = nullptr;
};
inline thread_local ThreadCtx tctx;

struct KernelExit {};  // thrown by a device-side assert to end its CUDA thread

// ---- global runtime state -------------------------------------------------------------------
struct State {
  std::mutex m;
  cudaError_t last = cudaSuccess;
  bool trapped = false;  // a device-side assert fired: the context is unusable
  std::map<const void*, int> max_dyn_smem;
  unsigned char* dyn_smem = nullptr;
};
inline State& state() {
  static State s;
  return s;
}

inline void set_error(cudaError_t e) {
  std::lock_guard<std::mutex> g(state().m);
  if (state().last == cudaSuccess) state().last = e;
}

}  // namespace qgait_emu

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline dim3 blockDim, gridDim;
constexpr int warpSize = 32;

// ---- runtime API ----------------------------------------------------------------------------
inline cudaError_t cudaGetLastError() {
  auto& s = qgait_emu::state();
  std::lock_guard<std::mutex> g(s.m);
  const cudaError_t e = s.last;
  if (!s.trapped) s.last = cudaSuccess;  // an assert is sticky, launch errors are not
  return e;
}
inline cudaError_t cudaPeekAtLastError() {
  std::lock_guard<std::mutex> g(qgait_emu::state().m);
  return qgait_emu::state().last;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorAssert: return "device-side assert triggered";
  }
  return "unknown error";
}
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
// The emulated device: an sm_80 (A100) as far as limits go.
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int dev) {
  if (dev != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = int(qgait_emu::kDefaultDynSmem); break;
    case cudaDevAttrMultiProcessorCount: *v = 108; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = int(qgait_emu::kMaxDynSmemOptIn); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
template <class F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  auto& s = qgait_emu::state();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      size_t(value) > qgait_emu::kMaxDynSmemOptIn) {
    qgait_emu::set_error(cudaErrorInvalidValue);
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> g(s.m);
  s.max_dyn_smem[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

// ---- the emulation's own controls (called by test drivers, never by the .cu files) ----------
namespace qgait_emu {
// Clears a device-side assert (a real context would have to be destroyed) and attributes.
inline void reset_device() {
  auto& s = state();
  std::lock_guard<std::mutex> g(s.m);
  s.last = cudaSuccess;
  s.trapped = false;
  s.max_dyn_smem.clear();
}
}  // namespace qgait_emu

// ---- block execution ------------------------------------------------------------------------
extern "C" unsigned char __start_qgait_emu_shared[];  // defined by the linker
extern "C" unsigned char __stop_qgait_emu_shared[];
// Weak, so a program whose kernels have no static __shared__ array still links.
#pragma weak __start_qgait_emu_shared
#pragma weak __stop_qgait_emu_shared

namespace qgait_emu {

#if QGAIT_EMU_USE_THREADS
// The persistent pool: worker i runs CUDA thread i of every block.
class Pool {
 public:
  static Pool& get() {
    static Pool p;
    return p;
  }
  // Runs body(tid) on threads 0..n-1 and returns when all have finished.
  void run(int n, const std::function<void(int)>& body) {
    grow(n);
    std::unique_lock<std::mutex> g(m_);
    body_ = &body;
    active_ = n;
    remaining_ = n;
    ++gen_;
    start_.notify_all();
    done_.wait(g, [&] { return remaining_ == 0; });
    body_ = nullptr;
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> g(m_);
      stop_ = true;
      ++gen_;
    }
    start_.notify_all();
    for (auto& t : threads_) t.join();
  }

 private:
  void grow(int n) {
    while (int(threads_.size()) < n) {
      const int i = int(threads_.size());
      threads_.emplace_back([this, i] { loop(i); });
    }
  }
  void loop(int i) {
    uint64_t seen = 0;
    {
      std::lock_guard<std::mutex> g(m_);
      seen = gen_;  // a worker created for this run joins it below
      if (body_ != nullptr) seen = gen_ - 1;
    }
    for (;;) {
      const std::function<void(int)>* body;
      {
        std::unique_lock<std::mutex> g(m_);
        start_.wait(g, [&] { return gen_ != seen; });
        seen = gen_;
        if (stop_) return;
        if (i >= active_) continue;
        body = body_;
      }
      (*body)(i);
      std::lock_guard<std::mutex> g(m_);
      if (--remaining_ == 0) done_.notify_all();
    }
  }
  std::mutex m_;
  std::condition_variable start_, done_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* body_ = nullptr;
  int active_ = 0, remaining_ = 0;
  uint64_t gen_ = 0;
  bool stop_ = false;
};

#endif

#if !QGAIT_EMU_USE_THREADS
#if defined(__SANITIZE_ADDRESS__)
#define QGAIT_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define QGAIT_EMU_ASAN 1
#endif
#endif
#ifdef QGAIT_EMU_ASAN
}  // namespace qgait_emu
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom,
                                               size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                                size_t* size_old);
namespace qgait_emu {
#endif

// Runs the CUDA threads of one block as fibers on the calling host thread.
class FiberRunner {
 public:
  static constexpr size_t kStack = 256 * 1024;  // per CUDA thread; a guard page below it

  static FiberRunner& get() {
    static thread_local FiberRunner r;
    return r;
  }
  ~FiberRunner() {
    for (auto& f : fibers_) munmap(f.mem, kStack + kGuard);
  }

  // Runs body(tid) for tid = 0..n-1; `salt` varies the schedule from block to block.
  void run(int n, uint64_t salt, const std::function<void(int)>& body) {
    while (int(fibers_.size()) < n) {
      Fiber f;
      f.mem = mmap(nullptr, kStack + kGuard, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (f.mem == MAP_FAILED) die("cannot map a fiber stack");
      mprotect(f.mem, kGuard, PROT_NONE);  // a stack overflow faults instead of corrupting
      fibers_.push_back(f);
    }
    body_ = &body;
    // A pseudo-random order of the threads (Fisher-Yates on a 64-bit LCG): a fixed order
    // would hide every missing barrier between a thread and the lower-numbered ones.
    order_.resize(n);
    for (int i = 0; i < n; ++i) order_[i] = i;
    uint64_t st = salt * 6364136223846793005ull + 1442695040888963407ull;
    for (int i = n - 1; i > 0; --i) {
      st = st * 6364136223846793005ull + 1442695040888963407ull;
      std::swap(order_[i], order_[int((st >> 33) % uint64_t(i + 1))]);
    }
    for (int i = 0; i < n; ++i) {
      Fiber& f = fibers_[i];
      f.done = false;
      f.wait = nullptr;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = static_cast<char*>(f.mem) + kGuard;
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, &FiberRunner::entry, 0);
    }
    int remaining = n;
    while (remaining > 0) {
      bool progressed = false;
      for (int k = 0; k < n; ++k) {
        const int i = order_[k];
        Fiber& f = fibers_[i];
        if (f.done || (f.wait != nullptr && f.wait->gen() == f.wait_gen)) continue;
        f.wait = nullptr;
        resume(i);
        progressed = true;
        if (f.done) --remaining;
      }
      if (!progressed)
        die("deadlock: a __syncthreads or full-mask shuffle that not every live thread of the "
            "block / warp reaches (a barrier in divergent code)");
    }
    body_ = nullptr;
  }

  // Called by a fiber: waits (yielding) until b's generation is no longer `gen`.
  void block_on(Barrier* b, uint64_t gen) {
    Fiber& f = fibers_[cur_];
    f.wait = b;
    f.wait_gen = gen;
    to_scheduler(false);
  }

 private:
  static constexpr size_t kGuard = 4096;
  struct Fiber {
    ucontext_t ctx;
    void* mem = nullptr;
    bool done = false;
    Barrier* wait = nullptr;
    uint64_t wait_gen = 0;
  };

  void resume(int i) {
    cur_ = i;
    set_thread(i);
#ifdef QGAIT_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, static_cast<char*>(fibers_[i].mem) + kGuard, kStack);
#endif
    swapcontext(&main_, &fibers_[i].ctx);
#ifdef QGAIT_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  }
  void to_scheduler(bool exiting) {
    Fiber& f = fibers_[cur_];
#ifdef QGAIT_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(exiting ? nullptr : &fake, main_bottom_, main_size_);
#endif
    if (exiting) {
      setcontext(&main_);
    } else {
      swapcontext(&f.ctx, &main_);
    }
#ifdef QGAIT_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, &main_bottom_, &main_size_);
#endif
  }
  static void entry() {
    FiberRunner& r = get();
#ifdef QGAIT_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &r.main_bottom_, &r.main_size_);
#endif
    const int i = r.cur_;
    (*r.body_)(i);
    r.fibers_[r.cur_].done = true;
    r.to_scheduler(true);
  }
  static void set_thread(int i);  // threadIdx / tctx of CUDA thread i (defined below)

  std::vector<Fiber> fibers_;
  std::vector<int> order_;
  ucontext_t main_;
  const void* main_bottom_ = nullptr;
  size_t main_size_ = 0;
  const std::function<void(int)>* body_ = nullptr;
  int cur_ = 0;
};

inline void fiber_block_on(Barrier* b, uint64_t gen) { FiberRunner::get().block_on(b, gen); }
#endif  // !QGAIT_EMU_USE_THREADS

inline void fill_garbage(unsigned char* p, size_t n) {
  // 0xFF bytes: every float reads as NaN, every int as -1.
  if (n) std::memset(p, 0xFF, n);
}

// threadIdx and the thread context of linear thread `tid` of the current block.
inline void set_thread_index(int tid) {
  const unsigned t = unsigned(tid);
  threadIdx = {t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
  tctx.tid = tid;
}
#if !QGAIT_EMU_USE_THREADS
inline void FiberRunner::set_thread(int i) { set_thread_index(i); }
#endif

// One launch: checks the configuration as CUDA does, then runs the blocks in order.
inline void run_launch(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem,
                       const std::function<void()>& body) {
  auto& s = state();
  {
    std::lock_guard<std::mutex> g(s.m);
    if (s.trapped) return;  // the context is gone; the error stays sticky
  }
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || nthreads == 0 || block.x > 1024 ||
      block.y > 1024 || block.z > 64 || nthreads > 1024 || grid.x > 0x7fffffffu ||
      grid.y > 65535 || grid.z > 65535) {
    if (std::getenv("QGAIT_EMU_VERBOSE"))
      std::fprintf(stderr, "qgait CUDA emulation: %s: invalid configuration grid (%u, %u, %u) "
                   "block (%u, %u, %u)\n", name, grid.x, grid.y, grid.z, block.x, block.y,
                   block.z);
    set_error(cudaErrorInvalidConfiguration);
    return;
  }
  size_t limit = kDefaultDynSmem;
  {
    std::lock_guard<std::mutex> g(s.m);
    auto it = s.max_dyn_smem.find(kernel);
    if (it != s.max_dyn_smem.end()) limit = size_t(it->second);
  }
  if (smem > limit) {
    if (std::getenv("QGAIT_EMU_VERBOSE"))
      std::fprintf(stderr, "qgait CUDA emulation: %s: %zu bytes of dynamic shared memory, "
                   "limit %zu\n", name, smem, limit);
    set_error(cudaErrorInvalidValue);
    return;
  }
  // Exactly `smem` bytes (ASan sees any overrun), garbage-filled, fresh for each launch.
  std::unique_ptr<unsigned char[]> dyn(new unsigned char[smem > 0 ? smem : 1]);
  fill_garbage(dyn.get(), smem);
  s.dyn_smem = dyn.get();
  blockDim = block;
  gridDim = grid;
  const int n = int(nthreads);
  Block blk;
  const int nwarps = (n + 31) / 32;
  for (int w = 0; w < nwarps; ++w) {
    blk.warps.emplace_back(new Warp);
    blk.warps.back()->size = n - 32 * w < 32 ? n - 32 * w : 32;
  }
  const std::function<void(int)> thread_body = [&](int tid) {
    set_thread_index(tid);
    tctx.block = &blk;
    try {
      body();
    } catch (const KernelExit&) {
    }
    // This thread has returned: barriers no longer wait for it.
    blk.warps[tid / 32]->bar.leave();
    blk.bar.leave();
#if QGAIT_EMU_USE_THREADS
    tctx.block = nullptr;
#endif
  };
  static uint64_t block_serial = 0;  // varies the fiber schedule from block to block
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        {
          std::lock_guard<std::mutex> g(s.m);
          if (s.trapped) break;
        }
        if (__start_qgait_emu_shared != nullptr)
          fill_garbage(__start_qgait_emu_shared,
                       size_t(__stop_qgait_emu_shared - __start_qgait_emu_shared));
        blk.bar.reset(n);
        for (int w = 0; w < nwarps; ++w) blk.warps[w]->bar.reset(blk.warps[w]->size);
        const uint3 b{bx, by, bz};
#if QGAIT_EMU_USE_THREADS
        Pool::get().run(n, [&](int tid) {
          blockIdx = b;
          thread_body(tid);
        });
#else
        blockIdx = b;
        tctx.block = &blk;
        FiberRunner::get().run(n, ++block_serial, thread_body);
        tctx.block = nullptr;
#endif
      }
  s.dyn_smem = nullptr;
}

template <class... P>
struct Launch {
  void (*kernel)(P...);
  const char* name;
  dim3 grid, block;
  size_t smem;
  template <class... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong argument count");
    // The arguments, converted to the kernel's parameter types once, as a launch copies them.
    const std::tuple<std::decay_t<P>...> args(std::forward<A>(a)...);
    run_launch(name, reinterpret_cast<const void*>(kernel), grid, block, smem,
               [&] { std::apply(kernel, args); });
  }
};

template <class... P>
Launch<P...> make_launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, const char* name,
                         void (*kernel)(P...)) {
  return Launch<P...>{kernel, name, grid, block, smem};
}

inline unsigned char* dynamic_smem() { return state().dyn_smem; }

// ---- device-side synchronisation ------------------------------------------------------------
inline Block& block_of_thread() {
  if (tctx.block == nullptr) die("__syncthreads / shuffle called outside a kernel");
  return *tctx.block;
}

inline void syncthreads() { block_of_thread().bar.wait(); }

inline Warp& warp_for(unsigned mask, const char* what) {
  Block& b = block_of_thread();
  Warp& w = *b.warps[tctx.tid / 32];
  if (mask != 0xffffffffu) die(what, ": only full masks (0xffffffff) are emulated");
  if (w.size != 32 || w.bar.live() != 32)
    die(what, ": full mask in a warp that is not full (partial block or an exited lane): "
              "undefined behaviour on the device");
  return w;
}

template <class T>
T shfl_impl(unsigned mask, T v, int src_lane_rel, int mode, int width, const char* what) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  Warp& w = warp_for(mask, what);
  const int lane = tctx.tid % 32;
  std::memcpy(w.slot[lane], &v, sizeof(T));
  w.bar.wait();
  const int seg = lane - lane % width;
  int src = lane;
  if (mode == 0) src = seg + ((src_lane_rel % width) + width) % width;  // __shfl_sync
  else if (mode == 1) src = lane - src_lane_rel >= seg ? lane - src_lane_rel : lane;  // up
  else if (mode == 2) src = lane + src_lane_rel < seg + width ? lane + src_lane_rel : lane;  // down
  else src = seg + ((lane - seg) ^ src_lane_rel) % width;  // xor
  T r;
  std::memcpy(&r, w.slot[src], sizeof(T));
  w.bar.wait();  // nobody overwrites a slot before every lane has read
  return r;
}

}  // namespace qgait_emu

#define QGAIT_EMU_DYN_SMEM() (::qgait_emu::dynamic_smem())

inline void __syncthreads() { qgait_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  qgait_emu::warp_for(mask, "__syncwarp").bar.wait();
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <class T>
T __shfl_sync(unsigned m, T v, int src, int width = 32) {
  return qgait_emu::shfl_impl(m, v, src, 0, width, "__shfl_sync");
}
template <class T>
T __shfl_up_sync(unsigned m, T v, unsigned d, int width = 32) {
  return qgait_emu::shfl_impl(m, v, int(d), 1, width, "__shfl_up_sync");
}
template <class T>
T __shfl_down_sync(unsigned m, T v, unsigned d, int width = 32) {
  return qgait_emu::shfl_impl(m, v, int(d), 2, width, "__shfl_down_sync");
}
template <class T>
T __shfl_xor_sync(unsigned m, T v, int lm, int width = 32) {
  return qgait_emu::shfl_impl(m, v, lm, 3, width, "__shfl_xor_sync");
}

// ---- atomics (host atomics on device memory) ------------------------------------------------
template <class T>
T atomicAdd(T* p, T v) {
  if constexpr (std::is_floating_point_v<T>) {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(p, &old, old + v, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED)) {
    }
    return old;
  } else {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
  }
}
template <class T>
T atomicExch(T* p, T v) {
  return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
}
template <class T>
T atomicCAS(T* p, T cmp, T v) {
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;
}
template <class T>
T atomicMax(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST,
                                                 __ATOMIC_RELAXED)) {
  }
  return old;
}

// ---- device-side assert ---------------------------------------------------------------------
// Ends the calling CUDA thread and poisons the context, as a device-side assert does; the
// process survives (a test can check the error code and the printed message).
namespace qgait_emu {
[[noreturn]] inline void device_assert_fail(const char* expr, const char* file, unsigned line,
                                            const char* func) {
  std::fprintf(stderr, "%s:%u: %s: block: [%u,%u,%u], thread: [%u,%u,%u] Assertion `%s` failed.\n",
               file, line, func, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y,
               threadIdx.z, expr);
  {
    auto& s = state();
    std::lock_guard<std::mutex> g(s.m);
    s.trapped = true;
    s.last = cudaErrorAssert;
  }
  if (tctx.block == nullptr) std::abort();  // not inside a kernel
  throw KernelExit{};
}
}  // namespace qgait_emu
// <cassert> is in; the .cu files call __assert_fail (device assert that survives NDEBUG), and
// glibc's assert macro expands to it as well.
#define __assert_fail ::qgait_emu::device_assert_fail

// ---- intrinsics ----------------------------------------------------------------------------
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline unsigned __float_as_uint(float f) { return unsigned(__float_as_int(f)); }
inline float __uint_as_float(unsigned u) { return __int_as_float(int(u)); }
// IEEE round-to-nearest operations: the host's, with contraction off (-ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
// Float -> int, round half to even; out of range and NaN as the device's cvt.rni.s32.f32
// (saturate; NaN -> 0).
inline int __float2int_rn(float v) {
  if (v != v) return 0;
  if (v >= 2147483648.0f) return 2147483647;
  if (v < -2147483648.0f) return int(-2147483647 - 1);
  return int(std::nearbyint(v));
}
inline int __float2int_rz(float v) {
  if (v != v) return 0;
  if (v >= 2147483648.0f) return 2147483647;
  if (v < -2147483648.0f) return int(-2147483647 - 1);
  return int(v);
}
// Four signed 8-bit products summed into c (exact int32, wrapping like the device).
inline int __dp4a(int a, int b, int c) {
  uint32_t acc = uint32_t(c);
  for (int j = 0; j < 4; ++j)
    acc += uint32_t(int32_t(int8_t(uint32_t(a) >> (8 * j))) *
                    int32_t(int8_t(uint32_t(b) >> (8 * j))));
  return int(acc);
}
inline int __dp4a(unsigned a, unsigned b, unsigned c) = delete;  // unsigned form not emulated
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(unsigned(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __mul24(int a, int b) { return a * b; }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }

// ---- 16-bit floats (round-to-nearest-even conversions, NaN -> the device's canonical 0x7FFF) --
struct __half {
  uint16_t __x;
};
struct __nv_bfloat16 {
  uint16_t __x;
};
using half = __half;
using nv_bfloat16 = __nv_bfloat16;

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.__x & 0x8000) << 16;
  const uint32_t exp = (h.__x >> 10) & 0x1F, man = h.__x & 0x3FF;
  float mag;
  if (exp == 0) {
    mag = std::ldexp(float(man), -24);  // zero or subnormal: exact
  } else if (exp == 31) {
    mag = man ? NAN : INFINITY;
  } else {
    mag = std::ldexp(float(man | 0x400), int(exp) - 25);
  }
  uint32_t u = __float_as_uint(mag) | sign;
  return __uint_as_float(u);
}
inline __half __float2half_rn(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000);
  const uint32_t a = u & 0x7FFFFFFF;
  if (a > 0x7F800000) return {0x7FFF};                       // NaN
  if (a >= 0x477FF000) return {uint16_t(sign | 0x7C00)};    // >= 65520 rounds to inf
  if (a < 0x38800000) {                                      // below 2^-14: subnormal or 0
    const float m = std::nearbyint(std::fabs(f) * 16777216.0f);  // exact scaling, RNE
    return {uint16_t(sign | uint16_t(m))};
  }
  const uint32_t r = (a - 0x38000000) + 0xFFF + ((a >> 13) & 1);  // rebias, round half even
  return {uint16_t(sign | (r >> 13))};
}
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(uint32_t(b.__x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7FFFFFFF) > 0x7F800000) return {0x7FFF};  // NaN
  return {uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16)};
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
