/*
 * The code table shared by capture.c and csrc/builtin (see sigcapture.h).
 */
#define _GNU_SOURCE 1
#include "sigcapture.h"
#include "pyframes.h"

#include <string.h>
#include <sys/mman.h>

static _Atomic uint64_t n_unknown_unreadable, n_unknown_full;

uint64_t pf_unknown_unreadable(void) { return atomic_load(&n_unknown_unreadable); }
uint64_t pf_unknown_full(void) { return atomic_load(&n_unknown_full); }

/* async-signal-safe: runs in the handler. */
static size_t arena_alloc(pf_codetable *t, size_t n) {
    size_t at = atomic_fetch_add(&t->arena_used, n);
    if (at + n > PF_ARENA_SIZE) return (size_t)-1;
    return at;
}

/* async-signal-safe: runs in the handler. */
static void copy_strings(pf_codetable *t, pf_code_t *e, const pf_codeinfo *ci) {
    char qn[PF_NAME_CAP], fn[PF_FILE_CAP], nm[PF_NAME_CAP];
    int qn_len = pf_read_str(ci->qualname, qn, PF_NAME_CAP);
    int fn_len = pf_read_str(ci->filename, fn, PF_FILE_CAP);
    int nm_len = 0;
    if (qn_len < 0) { memcpy(qn, "<unreadable>", 12); qn_len = 12; }
    if (fn_len < 0) { memcpy(fn, "<unreadable>", 12); fn_len = 12; }
    if (ci->name != ci->qualname) {
        nm_len = pf_read_str(ci->name, nm, PF_NAME_CAP);
        if (nm_len < 0) { memcpy(nm, "<unreadable>", 12); nm_len = 12; }
    }
    size_t off = arena_alloc(t, (size_t)qn_len + (size_t)fn_len + (size_t)nm_len);
    if (off == (size_t)-1) {
        e->qn_len = e->fn_len = e->nm_len = 0;
        e->qn_off = e->fn_off = e->nm_off = 0;
        return;
    }
    memcpy(t->arena + off, qn, (size_t)qn_len);
    memcpy(t->arena + off + qn_len, fn, (size_t)fn_len);
    e->qn_off = (uint32_t)off; e->qn_len = (uint16_t)qn_len;
    e->fn_off = (uint32_t)(off + qn_len); e->fn_len = (uint16_t)fn_len;
    if (ci->name != ci->qualname) {
        memcpy(t->arena + off + qn_len + fn_len, nm, (size_t)nm_len);
        e->nm_off = (uint32_t)(off + qn_len + fn_len); e->nm_len = (uint16_t)nm_len;
    } else {
        e->nm_off = e->qn_off; e->nm_len = e->qn_len;
    }
}

/* async-signal-safe: runs in the handler. */
uint32_t pf_code_index(pf_codetable *t, uintptr_t code, uintptr_t globals) {
    pf_codeinfo ci;
    if (pf_code_info(code, &ci) != 0) {
        atomic_fetch_add_explicit(&n_unknown_unreadable, 1, memory_order_relaxed);
        return PF_IDX_UNKNOWN;
    }
    /* The whole fingerprint: code objects re-created at a recycled address (exec in a loop)
       then spread over the table instead of piling up in one probe sequence. */
    uint64_t h = pf_hash_ptr(code ^ (ci.linetable * 31) ^ (ci.qualname * 17) ^ (ci.filename * 7), ci.firstlineno);
    for (int p = 0; p < PF_PROBES; p++) {
        uint32_t idx = (uint32_t)((h + (uint64_t)p) & (PF_CODE_CAP - 1));
        pf_code_t *e = &t->entries[idx];
        uintptr_t k = atomic_load_explicit(&e->code, memory_order_acquire);
        if (k == 0) {
            if (atomic_load_explicit(&t->count, memory_order_relaxed) >= PF_CODE_CAP * 7 / 8) break;
            uintptr_t expect = 0;
            if (atomic_compare_exchange_strong(&e->code, &expect, code)) {
                /* Ours: copy what must outlive the code object. */
                atomic_fetch_add(&t->count, 1);
                e->name = ci.name; e->qualname = ci.qualname; e->filename = ci.filename;
                e->linetable = ci.linetable; e->firstlineno = ci.firstlineno; e->globals = globals;
                copy_strings(t, e, &ci);
                e->lt_len = -1;
                /* The line table: its size first, then a copy straight into the arena. */
                size_t sz;
                if (ci.linetable != 0 && pf_bytes_size(ci.linetable, &sz) == 0 && sz <= PF_LINETABLE_CAP) {
                    size_t lo = arena_alloc(t, sz);
                    if (lo != (size_t)-1) {
                        int n = pf_read_bytes(ci.linetable, t->arena + lo, (int)sz);
                        if (n >= 0) { e->lt_off = (uint32_t)lo; e->lt_len = n; }
                    }
                }
                atomic_store_explicit(&e->ready, 1, memory_order_release);
                return idx;
            }
            k = atomic_load_explicit(&e->code, memory_order_acquire);
        }
        if (k == code && atomic_load_explicit(&e->ready, memory_order_acquire) &&
            e->firstlineno == ci.firstlineno && e->name == ci.name && e->qualname == ci.qualname &&
            e->filename == ci.filename && e->linetable == ci.linetable)
            return idx;
    }
    atomic_fetch_add_explicit(&n_unknown_full, 1, memory_order_relaxed);
    return PF_IDX_UNKNOWN;
}

void pf_codetable_clear(pf_codetable *t) {
    memset(t->entries, 0, sizeof(t->entries));
    atomic_store(&t->count, 0);
    atomic_store(&t->arena_used, 0);
    madvise(t->arena, PF_ARENA_SIZE, MADV_DONTNEED);
}
