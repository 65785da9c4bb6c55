// CPU emulator runtime (tests only; see emu.h): fibers, the block scheduler, exchange slots for warp
// collectives, cp.async groups, and the tensor-core mma instructions with the PTX ISA fragment layouts.
#include <cstdio>
#include <cstdlib>
#include <deque>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace emu
{
namespace
{
constexpr size_t kStack = 256 * 1024;
constexpr int kMaxThreads = 1024;

#if defined(__x86_64__)
// Minimal fiber switch (System V x86-64): save the callee-saved registers on the current stack, swap stack
// pointers, restore. No signal-mask system call, unlike swapcontext: the emulator switches fibers at every
// barrier and warp collective, so this is what keeps the tests fast.
extern "C" void ouro_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .type ouro_emu_switch,@function
ouro_emu_switch:
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
    .size ouro_emu_switch, .-ouro_emu_switch
)");
#endif

struct Fiber
{
    std::vector<char> stack;
#if defined(__x86_64__)
    void* sp = nullptr;
#else
    ucontext_t ctx;
#endif
    bool done = false;
};

struct Scheduler
{
    std::vector<Fiber> fibers;
#if defined(__x86_64__)
    void* main_sp = nullptr;
#else
    ucontext_t main_ctx;
#endif
    int cur = 0;
    int n = 0;
    std::function<void()> body;
};
Scheduler sched;
long g_round = 0; // scheduler rounds (barriers) since start

void finish_current();

[[noreturn]] void fiber_entry()
{
    sched.body();
    finish_current();
    std::abort(); // unreachable: a finished fiber is never resumed
}

void switch_to_main()
{
    Fiber& f = sched.fibers[sched.cur];
#if defined(__x86_64__)
    ouro_emu_switch(&f.sp, sched.main_sp);
#else
    swapcontext(&f.ctx, &sched.main_ctx);
#endif
}

void finish_current()
{
    sched.fibers[sched.cur].done = true;
    switch_to_main();
}

void resume(int t)
{
    Fiber& f = sched.fibers[t];
#if defined(__x86_64__)
    ouro_emu_switch(&sched.main_sp, f.sp);
#else
    swapcontext(&sched.main_ctx, &f.ctx);
#endif
}

void start(Fiber& f)
{
    f.done = false;
    if (f.stack.size() < kStack)
        f.stack.resize(kStack);
#if defined(__x86_64__)
    // Initial frame: six zeroed callee-saved registers, then the "return address" fiber_entry, placed so
    // that fiber_entry starts with the stack alignment of a called function (rsp % 16 == 8).
    uintptr_t top = reinterpret_cast<uintptr_t>(f.stack.data() + f.stack.size());
    top &= ~static_cast<uintptr_t>(15);
    void** sp = reinterpret_cast<void**>(top - 16);
    *sp = reinterpret_cast<void*>(&fiber_entry);
    for (int i = 0; i < 6; ++i)
        *--sp = nullptr;
    f.sp = sp;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_entry), 0);
#endif
}

Slot g_slots[2][kMaxThreads];
int g_count[kMaxThreads];

struct Copy
{
    void* dst;
    const void* src;
    int bytes, src_bytes;
};
struct PendingCopies
{
    std::deque<std::vector<Copy>> groups; // committed groups, oldest first
    std::vector<Copy> open;               // issued since the last commit
};
PendingCopies g_pending[kMaxThreads];

void land(const std::vector<Copy>& g)
{
    for (const Copy& c : g)
    {
        std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
        std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, static_cast<size_t>(c.bytes - c.src_bytes));
    }
}
} // namespace

void run_block(const dim3& block, std::function<void()> body)
{
    const int n = static_cast<int>(block.x * block.y * block.z);
    if (n > kMaxThreads)
    {
        std::fprintf(stderr, "emu: block of %d threads exceeds %d\n", n, kMaxThreads);
        std::abort();
    }
    sched.body = std::move(body);
    sched.n = n;
    if (static_cast<int>(sched.fibers.size()) < n)
        sched.fibers.resize(n);
    for (int t = 0; t < n; ++t)
    {
        start(sched.fibers[t]);
        g_count[t] = 0;
    }
    // OURO_EMU_ORDER=reverse resumes the fibers in reverse order: a missing barrier (a race) then
    // changes the result, which the tests detect by comparing both orders with the reference.
    const char* order = getenv("OURO_EMU_ORDER");
    const bool reverse = order && strcmp(order, "reverse") == 0;
    for (;;)
    {
        ++g_round;
        bool ran = false;
        for (int i = 0; i < n; ++i)
        {
            const int t = reverse ? n - 1 - i : i;
            if (sched.fibers[t].done)
                continue;
            sched.cur = t;
            threadIdx.x = t % block.x;
            threadIdx.y = (t / block.x) % block.y;
            threadIdx.z = t / (block.x * block.y);
            resume(t);
            ran = true;
        }
        if (!ran)
            break;
    }
}

void yield()
{
    switch_to_main();
}

int tid()
{
    return sched.cur;
}

int nthreads()
{
    return sched.n;
}

long round_id()
{
    return g_round;
}

Slot* slots(int parity)
{
    return g_slots[parity];
}

int& collective_count(int t)
{
    return g_count[t];
}

void cp_async(void* dst, const void* src, int bytes, int src_bytes)
{
    if (src_bytes < 0 || src_bytes > bytes)
    {
        std::fprintf(stderr, "emu: cp.async src-size %d outside [0, %d]\n", src_bytes, bytes);
        std::abort();
    }
    // PTX: both addresses aligned to the copy size (a GPU raises a misaligned-address error otherwise)
    const auto misaligned = [bytes](const void* p) { return reinterpret_cast<uintptr_t>(p) % bytes != 0; };
    if (misaligned(dst) || (src_bytes > 0 && misaligned(src)))
    {
        std::fprintf(stderr, "emu: cp.async of %d bytes with a misaligned address (dst %p, src %p)\n", bytes, dst,
                     src);
        std::abort();
    }
    g_pending[tid()].open.push_back(Copy{dst, src, bytes, src_bytes});
}

void cp_async_commit()
{
    PendingCopies& p = g_pending[tid()];
    p.groups.push_back(std::move(p.open));
    p.open.clear();
}

void cp_async_wait(int keep_groups)
{
    PendingCopies& p = g_pending[tid()];
    while (static_cast<int>(p.groups.size()) > keep_groups)
    {
        land(p.groups.front());
        p.groups.pop_front();
    }
}

void cp_async_reset()
{
    for (auto& p : g_pending)
    {
        p.groups.clear();
        p.open.clear();
    }
}
} // namespace emu

// ---------------------------------------------------------------------------------------------
// mma.sync emulation. Lane l = 4 * g + q (g = groupID = l / 4, q = threadID_in_group = l % 4). Every
// shape's accumulator layout: d[0], d[1] at row g, columns 2q, 2q+1; d[2], d[3] at row g + 8.
// Operand element positions (PTX ISA, "Matrix fragments for mma.m16n8k*"):
//   m16n8k32 .s8: A[m][k] in lane (m % 8) * 4 + (k % 16) / 4, register (m >= 8) + 2 * (k >= 16), byte k % 4;
//                 B[k][n] in lane n * 4 + (k % 16) / 4, register (k >= 16), byte k % 4.
//   m16n8k64 .s4: as .s8 with 8 nibbles per register (low nibble first): lane (m % 8) * 4 + (k % 32) / 8,
//                 register (m >= 8) + 2 * (k >= 32), nibble k % 8; B lane n * 4 + (k % 32) / 8, register (k >= 32).
//   m16n8k16 .f16: 2 halves per register (low half first): A lane (m % 8) * 4 + (k % 8) / 2, register
//                 (m >= 8) + 2 * (k >= 8), half k % 2; B lane n * 4 + (k % 8) / 2, register (k >= 8).
// ---------------------------------------------------------------------------------------------
namespace ouro
{
namespace
{
struct Frag
{
    uint32_t a[4];
    uint32_t b[2];
};

emu::Slot pack_frag(const uint32_t (&a)[4], const uint32_t (&b)[2])
{
    emu::Slot s{};
    for (int i = 0; i < 4; ++i)
        s.u[i] = a[i];
    s.u[4] = b[0];
    s.u[5] = b[1];
    return s;
}

int s8_at(uint32_t reg, int byte)
{
    return static_cast<int8_t>((reg >> (8 * byte)) & 0xFF);
}
int s4_at(uint32_t reg, int nib)
{
    const int v = static_cast<int>((reg >> (4 * nib)) & 0xF);
    return v >= 8 ? v - 16 : v;
}
float f16_at(uint32_t reg, int half)
{
    const uint16_t bits = static_cast<uint16_t>((reg >> (16 * half)) & 0xFFFF);
    _Float16 h;
    std::memcpy(&h, &bits, sizeof h);
    return static_cast<float>(h);
}

// The warp's operands decoded once per collective (the first lane to read decodes, the others reuse it).
template <typename V>
struct Decoded
{
    long round = -1;
    V a[16][64];
    V b[8][64];
};

template <typename Acc, typename Elem>
void warp_mma(Acc (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], int K, Elem elem)
{
    static Decoded<Acc> cache[32];
    emu::collective(pack_frag(a, b), [&](emu::Slot* s, int t) {
        const int base = t & ~31;
        const int lane = t & 31;
        Decoded<Acc>& dec = cache[t / 32];
        if (dec.round != emu::round_id())
        {
            for (int k = 0; k < K; ++k)
            {
                for (int m = 0; m < 16; ++m)
                    dec.a[m][k] = static_cast<Acc>(elem(s + base, true, m, k));
                for (int n = 0; n < 8; ++n)
                    dec.b[n][k] = static_cast<Acc>(elem(s + base, false, n, k));
            }
            dec.round = emu::round_id();
        }
        const int g = lane / 4, q = lane % 4;
        for (int e = 0; e < 4; ++e)
        {
            const int m = g + 8 * (e >= 2);
            const int n = 2 * q + (e & 1);
            Acc acc = d[e];
            for (int k = 0; k < K; ++k)
                acc += dec.a[m][k] * dec.b[n][k];
            d[e] = acc;
        }
    });
}
} // namespace

void mma_s8_m16n8k32(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2])
{
    warp_mma(d, a, b, 32, [](const emu::Slot* w, bool is_a, int r, int k) {
        if (is_a)
            return s8_at(w[(r % 8) * 4 + (k % 16) / 4].u[(r >= 8) + 2 * (k >= 16)], k % 4);
        return s8_at(w[r * 4 + (k % 16) / 4].u[4 + (k >= 16)], k % 4);
    });
}

void mma_s4_m16n8k64(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2])
{
    warp_mma(d, a, b, 64, [](const emu::Slot* w, bool is_a, int r, int k) {
        if (is_a)
            return s4_at(w[(r % 8) * 4 + (k % 32) / 8].u[(r >= 8) + 2 * (k >= 32)], k % 8);
        return s4_at(w[r * 4 + (k % 32) / 8].u[4 + (k >= 32)], k % 8);
    });
}

void mma_f16_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2])
{
    // fp32 accumulation in k order (the hardware's internal order and rounding may differ: tests of the fp16
    // outlier term use a named tolerance, not bit equality).
    warp_mma(d, a, b, 16, [](const emu::Slot* w, bool is_a, int r, int k) {
        if (is_a)
            return f16_at(w[(r % 8) * 4 + (k % 8) / 2].u[(r >= 8) + 2 * (k >= 8)], k % 2);
        return f16_at(w[r * 4 + (k % 8) / 2].u[4 + (k >= 8)], k % 2);
    });
}
} // namespace ouro
