/*
 * Fault-tolerant loads for the signal handler.
 *
 * The handler reads the interrupted thread's frames while that thread may be in the middle of
 * pushing or popping one, so a pointer it follows can be stale. Every such read goes through
 * pf_safe_load, a single load instruction at a known address. If it faults, our SIGSEGV/SIGBUS
 * handler sees the faulting PC is that instruction, makes the load return 0, sets the caller's
 * fault flag and resumes after it. Any other fault is passed on to the handler that was installed
 * before ours (async-profiler's crash handler, faulthandler, or the default action).
 *
 * The same technique as async-profiler's SafeAccess; this is our own implementation.
 */
#define _GNU_SOURCE 1
#include "pyframes.h"

#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <ucontext.h>

/* uintptr_t pf_safe_load(uintptr_t addr, int *fault): *fault is only written on a fault. */
extern uintptr_t pf_safe_load(uintptr_t addr, int *fault);
extern char pf_safe_load_insn[], pf_safe_load_resume[];

#if defined(__x86_64__)
__asm__(
    ".text\n"
    ".globl pf_safe_load\n"
    ".hidden pf_safe_load\n"
    ".type pf_safe_load, @function\n"
    "pf_safe_load:\n"
    ".globl pf_safe_load_insn\n"
    ".hidden pf_safe_load_insn\n"
    "pf_safe_load_insn:\n"
    "    movq (%rdi), %rax\n"
    ".globl pf_safe_load_resume\n"
    ".hidden pf_safe_load_resume\n"
    "pf_safe_load_resume:\n"
    "    ret\n"
    ".size pf_safe_load, .-pf_safe_load\n");
#define PC(uc) ((uc)->uc_mcontext.gregs[REG_RIP])
#define SET_RESULT(uc, v) ((uc)->uc_mcontext.gregs[REG_RAX] = (greg_t)(v))
#define FAULT_PTR(uc) ((int *)(uintptr_t)(uc)->uc_mcontext.gregs[REG_RSI])
#define SUPPORTED 1
#elif defined(__aarch64__)
__asm__(
    ".text\n"
    ".globl pf_safe_load\n"
    ".hidden pf_safe_load\n"
    ".type pf_safe_load, %function\n"
    "pf_safe_load:\n"
    ".globl pf_safe_load_insn\n"
    ".hidden pf_safe_load_insn\n"
    "pf_safe_load_insn:\n"
    "    ldr x0, [x0]\n"
    ".globl pf_safe_load_resume\n"
    ".hidden pf_safe_load_resume\n"
    "pf_safe_load_resume:\n"
    "    ret\n"
    ".size pf_safe_load, .-pf_safe_load\n");
#define PC(uc) ((uc)->uc_mcontext.pc)
#define SET_RESULT(uc, v) ((uc)->uc_mcontext.regs[0] = (uint64_t)(v))
#define FAULT_PTR(uc) ((int *)(uintptr_t)(uc)->uc_mcontext.regs[1])
#define SUPPORTED 1
#else
#define SUPPORTED 0
#endif

static struct sigaction prev_segv, prev_bus;
static _Atomic int installed;
static _Atomic unsigned long long recovered;

unsigned long long pf_safeload_faults(void) { return atomic_load(&recovered); }

static void chain(int sig, siginfo_t *info, void *ucontext) {
    struct sigaction *prev = sig == SIGBUS ? &prev_bus : &prev_segv;
    if (prev->sa_flags & SA_SIGINFO) {
        if (prev->sa_sigaction != NULL) {
            prev->sa_sigaction(sig, info, ucontext);
            return;
        }
    } else if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN) {
        prev->sa_handler(sig);
        return;
    }
    /* Default action: restore it; returning re-executes the faulting instruction, which then
       terminates the process as if we had never been there. */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
}

static void fault_handler(int sig, siginfo_t *info, void *ucontext) {
#if SUPPORTED
    ucontext_t *uc = (ucontext_t *)ucontext;
    if (uc != NULL && (uintptr_t)PC(uc) == (uintptr_t)pf_safe_load_insn &&
        (info == NULL || info->si_code > 0 /* raised by the kernel, not kill() */)) {
        int *fault = FAULT_PTR(uc);
        if (fault != NULL) *fault = 1;
        atomic_fetch_add_explicit(&recovered, 1, memory_order_relaxed);
        SET_RESULT(uc, 0);
        PC(uc) = (__typeof__(PC(uc)))(uintptr_t)pf_safe_load_resume;
        return;
    }
#endif
    chain(sig, info, ucontext);
}

int pf_safeload_segv_active(void) {
    if (!SUPPORTED || !atomic_load(&installed)) return 0;
    struct sigaction cur;
    return sigaction(SIGSEGV, NULL, &cur) == 0 && cur.sa_sigaction == fault_handler;
}

int pf_safeload_active(void) {
    if (!SUPPORTED || !atomic_load(&installed)) return 0;
    struct sigaction cur;
    if (sigaction(SIGSEGV, NULL, &cur) != 0 || cur.sa_sigaction != fault_handler) return 0;
    if (sigaction(SIGBUS, NULL, &cur) != 0 || cur.sa_sigaction != fault_handler) return 0;
    return 1;
}

static int install_one(int sig, struct sigaction *prev) {
    struct sigaction cur;
    if (sigaction(sig, NULL, &cur) != 0) return -1;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == fault_handler) return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = fault_handler;
    /* SA_NODEFER: a fault inside the previous handler reaches it again (as without us). */
    sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_NODEFER | (cur.sa_flags & SA_ONSTACK);
    sigemptyset(&sa.sa_mask);
    /* The previous handler is saved before ours is visible: a fault cannot see a stale one. */
    *prev = cur;
    return sigaction(sig, &sa, NULL);
}

int pf_safeload_install(void) {
    if (!SUPPORTED) return -1;
    if (install_one(SIGSEGV, &prev_segv) != 0) return -1;
    if (install_one(SIGBUS, &prev_bus) != 0) return -1;
    atomic_store(&installed, 1);
    return 0;
}

void pf_safeload_uninstall(void) {
    if (!atomic_load(&installed)) return;
    struct sigaction cur;
    if (sigaction(SIGSEGV, NULL, &cur) == 0 && cur.sa_sigaction == fault_handler)
        sigaction(SIGSEGV, &prev_segv, NULL);
    if (sigaction(SIGBUS, NULL, &cur) == 0 && cur.sa_sigaction == fault_handler)
        sigaction(SIGBUS, &prev_bus, NULL);
    atomic_store(&installed, 0);
}

/* Lowest and highest address a user-space pointer can have: rejects NULL-page and
   kernel/non-canonical pointers before they reach the load. */
#define MIN_ADDR ((uintptr_t)4096)
#define MAX_ADDR ((uintptr_t)1 << 47)

__attribute__((no_sanitize_address))
int pf_safe_word(uintptr_t src, uintptr_t *out) {
    if (src < MIN_ADDR || src >= MAX_ADDR || (src & (sizeof(uintptr_t) - 1)) != 0) return -1;
    int fault = 0;
    uintptr_t v = pf_safe_load(src, &fault);
    __asm__ __volatile__("" ::: "memory");
    if (fault) return -1;
    *out = v;
    return 0;
}

__attribute__((no_sanitize_address))
int pf_safe_copy(void *dst, uintptr_t src, size_t n) {
    if (n == 0) return 0;
    if (src < MIN_ADDR || src >= MAX_ADDR || n > MAX_ADDR - src) return -1;
    const size_t W = sizeof(uintptr_t);
    if ((src & (W - 1)) == 0 && (n & (W - 1)) == 0) {
        /* the common case: whole aligned words */
        for (size_t off = 0; off < n; off += W) {
            int fault = 0;
            uintptr_t v = pf_safe_load(src + off, &fault);
            __asm__ __volatile__("" ::: "memory");
            if (fault) return -1;
            memcpy((unsigned char *)dst + off, &v, W);
        }
        return 0;
    }
    uintptr_t start = src & ~(uintptr_t)(W - 1);
    uintptr_t end = (src + n + W - 1) & ~(uintptr_t)(W - 1);
    unsigned char *d = (unsigned char *)dst;
    size_t done = 0;
    for (uintptr_t a = start; a < end; a += W) {
        int fault = 0;
        uintptr_t v = pf_safe_load(a, &fault);
        __asm__ __volatile__("" ::: "memory");
        if (fault) return -1;
        const unsigned char *bytes = (const unsigned char *)&v;
        for (size_t i = 0; i < W; i++) {
            uintptr_t at = a + i;
            if (at >= src && at < src + n) d[done++] = bytes[i];
        }
    }
    return 0;
}
