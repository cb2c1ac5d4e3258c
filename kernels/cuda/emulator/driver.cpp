// An emulated CUDA driver and cuBLAS for machines without a GPU: the entry points of libcuda and
// libcublas that cudarc calls for Keel's backend, on host memory, each op done when it is called
// (a stream in order, trivially). Kernels are ours (kernels/cuda/*.cu) compiled as host C++
// (emulate.h; scripts/cuda-emulator.sh generates their table). NVRTC is the real one: the PTX it
// writes is loaded as a module and must name every kernel asked for.
//
// New memory is filled with NaN bits, so that reading what no kernel wrote shows in the results.
#include "emulate.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace emu {
thread_local emu_dim3 thread_idx, block_idx, block_dim;
}

#include "kernel.h"

// ---- fibers: one block's threads, switching at each barrier ----
// A switch saves the callee-saved registers on the stack it leaves and the stack pointer in
// *from, then takes `to`'s (x86-64 System V; ucontext's swapcontext would make a system call
// each time, and a block's barriers are thousands of switches).
extern "C" void emu_switch(void **from, void *to);
asm(R"(
.text
.globl emu_switch
.type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
)");

namespace {
struct Fiber {
    void *sp;
    bool done;
};
thread_local void *scheduler;
thread_local std::vector<Fiber> fibers;
thread_local std::vector<std::vector<char>> stacks;
thread_local unsigned current;
thread_local bool in_fibers;
thread_local Call running;
thread_local void **running_args;
thread_local float lanes[1024];
constexpr size_t STACK = 256 * 1024;

[[noreturn]] void fiber_entry() {
    running(running_args);
    fibers[current].done = true;
    emu_switch(&fibers[current].sp, scheduler);
    std::abort();  // a finished fiber is never resumed
}

// A fresh stack whose first switch "returns" into fiber_entry, as if called (16-byte aligned).
void *fresh_stack(std::vector<char> &stack) {
    auto top = (uintptr_t)(stack.data() + stack.size()) & ~(uintptr_t)15;
    void **sp = (void **)top;
    *--sp = nullptr;                  // fiber_entry's return address: never used
    *--sp = (void *)&fiber_entry;     // where emu_switch's ret goes
    for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp, rbx, r12-r15
    return sp;
}

void run_block(const Kernel &k, void **args, unsigned threads) {
    if (!k.syncs) {
        for (unsigned t = 0; t < threads; ++t) {
            emu::thread_idx = {t, 0, 0};
            k.call(args);
        }
        return;
    }
    fibers.assign(threads, Fiber{});
    while (stacks.size() < threads) stacks.emplace_back(STACK);
    running = k.call;
    running_args = args;
    for (unsigned t = 0; t < threads; ++t) fibers[t].sp = fresh_stack(stacks[t]);
    // Each pass runs every live thread to its next barrier (or its end): a barrier is passed
    // only when all live threads have reached it.
    in_fibers = true;
    for (bool live = true; live;) {
        live = false;
        for (unsigned t = 0; t < threads; ++t) {
            if (fibers[t].done) continue;
            current = t;
            emu::thread_idx = {t, 0, 0};
            emu_switch(&scheduler, fibers[t].sp);
            live |= !fibers[t].done;
        }
    }
    in_fibers = false;
}
}  // namespace

namespace emu {
void sync() {
    if (!in_fibers) {
        std::fprintf(stderr, "cuda emulator: a kernel marked as not synchronizing called a barrier\n");
        std::abort();
    }
    emu_switch(&fibers[current].sp, scheduler);
}

float shfl_xor(float v, int lane) {
    lanes[current] = v;
    sync();
    const float other = lanes[current ^ (unsigned)lane];
    sync();
    return other;
}

unsigned short f32_to_f16(float v) {
    uint32_t x;
    std::memcpy(&x, &v, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const int exp = (int)((x >> 23) & 0xff) - 127 + 15;
    uint32_t mant = x & 0x7fffffu;
    if (((x >> 23) & 0xff) == 0xff) return sign | 0x7c00u | (mant ? 0x200u : 0);
    if (exp >= 31) return sign | 0x7c00u;
    if (exp <= 0) {
        if (exp < -10) return sign;
        mant |= 0x800000u;
        const int shift = 14 - exp;
        uint32_t half = mant >> shift;
        const uint32_t rest = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rest > mid || (rest == mid && (half & 1))) ++half;
        return sign | half;
    }
    uint32_t half = ((uint32_t)exp << 10) | (mant >> 13);
    const uint32_t rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1))) ++half;
    return sign | half;
}
}  // namespace emu

static float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    int exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ffu, x;
    if (exp == 0x1f) {
        x = sign | 0x7f800000u | (mant << 13);
    } else if (exp == 0) {
        if (mant == 0) {
            x = sign;
        } else {
            exp = 1;
            while (!(mant & 0x400u)) {
                mant <<= 1;
                --exp;
            }
            x = sign | (uint32_t)(exp - 15 + 127) << 23 | (mant & 0x3ffu) << 13;
        }
    } else {
        x = sign | (uint32_t)(exp - 15 + 127) << 23 | mant << 13;
    }
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

// ---- the driver API ----
typedef int CUresult;
typedef unsigned long long CUdeviceptr;
enum { OK = 0, INVALID_VALUE = 1, NOT_FOUND = 500, INVALID_HANDLE = 400 };

namespace {
std::mutex device_lock;  // one "stream": every op runs alone, in call order
struct Module {
    std::string ptx;
};
// A stream-ordered pool: freed blocks are kept by size and handed out again.
struct Pool {
    std::multimap<size_t, void *> free;
    uint64_t reserved = 0, used = 0;
};
Pool default_pool;
std::map<void *, std::pair<size_t, Pool *>> live;  // every block handed out, and its pool
int context_token, stream_token;
void *current_context = nullptr;

CUresult pool_alloc(Pool *pool, CUdeviceptr *p, size_t bytes) {
    void *block;
    auto it = pool->free.find(bytes);
    if (it != pool->free.end()) {
        block = it->second;
        pool->free.erase(it);
    } else {
        block = std::malloc(bytes ? bytes : 1);
        if (!block) return 2;  // out of memory
        pool->reserved += bytes;
    }
    std::memset(block, 0xff, bytes);  // NaN bits: a read of what nothing wrote shows
    live[block] = {bytes, pool};
    pool->used += bytes;
    *p = (CUdeviceptr)block;
    return OK;
}
}  // namespace

extern "C" {
CUresult cuInit(unsigned) { return OK; }
CUresult cuDriverGetVersion(int *v) { return *v = 12040, OK; }
CUresult cuDeviceGetCount(int *n) { return *n = 1, OK; }
CUresult cuDeviceGet(int *d, int ordinal) { return ordinal == 0 ? (*d = 0, OK) : INVALID_VALUE; }
CUresult cuDeviceGetName(char *name, int len, int) {
    std::snprintf(name, len, "Keel CUDA emulator (host)");
    return OK;
}
CUresult cuDeviceTotalMem_v2(size_t *bytes, int) { return *bytes = size_t(16) << 30, OK; }
CUresult cuDeviceGetAttribute(int *v, int attribute, int) {
    switch (attribute) {
    case 75: *v = 9; break;   // compute capability major
    case 76: *v = 0; break;   // minor
    case 115: *v = 1; break;  // memory pools supported
    default: *v = 0;
    }
    return OK;
}
CUresult cuDevicePrimaryCtxRetain(void **ctx, int) { return *ctx = &context_token, OK; }
CUresult cuDevicePrimaryCtxRelease_v2(int) { return OK; }
CUresult cuDevicePrimaryCtxRelease(int) { return OK; }
CUresult cuCtxGetCurrent(void **ctx) { return *ctx = current_context, OK; }
CUresult cuCtxSetCurrent(void *ctx) { return current_context = ctx, OK; }
CUresult cuCtxSynchronize() { return OK; }
CUresult cuStreamCreate(void **s, unsigned) { return *s = &stream_token, OK; }
CUresult cuStreamDestroy_v2(void *) { return OK; }
CUresult cuStreamSynchronize(void *) { return OK; }
CUresult cuGetErrorString(CUresult, const char **s) { return *s = "emulated driver error", OK; }
CUresult cuGetErrorName(CUresult, const char **s) { return *s = "CUDA_ERROR_EMULATED", OK; }
CUresult cuDeviceGetDefaultMemPool(void **pool, int) { return *pool = &default_pool, OK; }
CUresult cuMemPoolCreate(void **pool, const void *) { return *pool = new Pool, OK; }
CUresult cuMemPoolDestroy(void *pool) {
    std::lock_guard<std::mutex> g(device_lock);
    auto *p = (Pool *)pool;
    for (auto &[bytes, block] : p->free) std::free(block);
    for (auto &[block, owner] : live) {
        if (owner.second == p) {
            std::fprintf(stderr, "cuda emulator: pool destroyed with %zu bytes in use\n", owner.first);
            return INVALID_VALUE;
        }
    }
    if (p != &default_pool) delete p;
    return OK;
}
CUresult cuMemPoolSetAttribute(void *, int, void *) { return OK; }
CUresult cuMemPoolGetAttribute(void *pool, int attribute, void *value) {
    std::lock_guard<std::mutex> g(device_lock);
    const Pool *p = (const Pool *)pool;
    *(uint64_t *)value = attribute == 5 /* RESERVED_MEM_CURRENT */ ? p->reserved : p->used;
    return OK;
}

CUresult cuMemAllocAsync(CUdeviceptr *p, size_t bytes, void *) {
    std::lock_guard<std::mutex> g(device_lock);
    return pool_alloc(&default_pool, p, bytes);
}
CUresult cuMemAllocFromPoolAsync(CUdeviceptr *p, size_t bytes, void *pool, void *) {
    std::lock_guard<std::mutex> g(device_lock);
    return pool_alloc((Pool *)pool, p, bytes);
}
CUresult cuMemFreeAsync(CUdeviceptr p, void *) {
    std::lock_guard<std::mutex> g(device_lock);
    auto it = live.find((void *)p);
    if (it == live.end()) {
        std::fprintf(stderr, "cuda emulator: free of %p, which is not allocated\n", (void *)p);
        return INVALID_VALUE;
    }
    auto [bytes, pool] = it->second;
    pool->used -= bytes;
    pool->free.emplace(bytes, it->first);
    live.erase(it);
    return OK;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, void *) {
    std::lock_guard<std::mutex> g(device_lock);
    std::memcpy((void *)dst, src, n);
    return OK;
}
CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, void *) {
    std::lock_guard<std::mutex> g(device_lock);
    std::memcpy(dst, (const void *)src, n);
    return OK;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void *) {
    std::lock_guard<std::mutex> g(device_lock);
    std::memmove((void *)dst, (const void *)src, n);
    return OK;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void *) {
    std::lock_guard<std::mutex> g(device_lock);
    std::memset((void *)dst, v, n);
    return OK;
}

CUresult cuModuleLoadData(void **module, const void *image) {
    *module = new Module{(const char *)image};
    return OK;
}
CUresult cuModuleUnload(void *module) {
    delete (Module *)module;
    return OK;
}
CUresult cuModuleGetFunction(void **f, void *module, const char *name) {
    const std::string entry = std::string(".entry ") + name + "(";
    if (((Module *)module)->ptx.find(entry) == std::string::npos) return NOT_FOUND;
    for (const Kernel &k : kernels()) {
        if (std::strcmp(k.name, name) == 0) return *f = (void *)&k, OK;
    }
    return NOT_FOUND;
}
CUresult cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, void *, void **args, void **extra) {
    const Kernel &k = *(const Kernel *)f;
    if (by != 1 || bz != 1 || bx == 0 || bx > 1024 || shared != 0 || extra) return INVALID_VALUE;
    std::lock_guard<std::mutex> g(device_lock);
    emu::block_dim = {bx, 1, 1};
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                emu::block_idx = {x, y, z};
                run_block(k, args, bx);
            }
    return OK;
}
}

// ---- cuBLAS: column-major products, on the host ----
typedef int cublasStatus_t;
static int blas_token;

// C[m, n] = alpha op(A) op(B) + beta C, column-major, op 0: as is, 1: transposed.
template <class T>
static void gemm(int ta, int tb, int m, int n, int k, float alpha, const T *a, int lda, const T *b, int ldb,
                 float beta, float *c, int ldc, float (*load)(T)) {
    std::lock_guard<std::mutex> g(device_lock);
    for (int j = 0; j < n; ++j)
        for (int i = 0; i < m; ++i) {
            float s = 0.0f;
            for (int p = 0; p < k; ++p) {
                const float av = load(ta ? a[p + (size_t)i * lda] : a[i + (size_t)p * lda]);
                const float bv = load(tb ? b[j + (size_t)p * ldb] : b[p + (size_t)j * ldb]);
                s += av * bv;
            }
            float &out = c[i + (size_t)j * ldc];
            out = alpha * s + (beta == 0.0f ? 0.0f : beta * out);
        }
}

extern "C" {
cublasStatus_t cublasCreate_v2(void **handle) { return *handle = &blas_token, 0; }
cublasStatus_t cublasDestroy_v2(void *) { return 0; }
cublasStatus_t cublasSetStream_v2(void *, void *) { return 0; }

cublasStatus_t cublasSgemm_v2(void *, int ta, int tb, int m, int n, int k, const float *alpha, const float *a,
                              int lda, const float *b, int ldb, const float *beta, float *c, int ldc) {
    gemm<float>(ta, tb, m, n, k, *alpha, a, lda, b, ldb, *beta, c, ldc, [](float v) { return v; });
    return 0;
}

// Only the f16 x f16 -> f32 product the backend asks for (CUDA_R_16F = 2, CUDA_R_32F = 0).
cublasStatus_t cublasGemmEx(void *, int ta, int tb, int m, int n, int k, const void *alpha, const void *a,
                            int a_type, int lda, const void *b, int b_type, int ldb, const void *beta, void *c,
                            int c_type, int ldc, int, int) {
    if (a_type != 2 || b_type != 2 || c_type != 0) return 7;  // not supported
    gemm<uint16_t>(ta, tb, m, n, k, *(const float *)alpha, (const uint16_t *)a, lda, (const uint16_t *)b, ldb,
                   *(const float *)beta, (float *)c, ldc, f16_to_f32);
    return 0;
}
}
