/*
 * The sample store: two halves. Handlers write to bi.halves[bi.cur] (pinned while they do);
 * collect() swaps bi.cur and drains the other half once no handler uses it. Everything is
 * mapped once (MAP_NORESERVE: only touched pages count) and given back to the kernel after
 * each drain (MADV_DONTNEED), so memory stays bounded by one reporting interval's samples.
 */
#define _GNU_SOURCE 1
#include "builtin.h"

#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

struct bi_state bi;
bi_wall_last bi_wall_lasts[BI_MAX_THREADS];
bi_cpu_last bi_cpu_lasts[BI_MAX_THREADS];
_Atomic uint16_t bi_perf_slot[BI_PERF_FD_MAX];
static _Atomic uint32_t epochs;

static void *map_anon(size_t n) {
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

#define SAMPLES_BYTES ((size_t)BI_SAMPLE_CAP * sizeof(bi_sample))
#define STACKS_BYTES ((size_t)BI_STACK_CAP * sizeof(bi_stack))
#define FRAMES_BYTES ((size_t)BI_FRAME_CAP * sizeof(bi_frame))
#ifdef ASPROF_WALKER
#define CODES_BYTES ((sizeof(pf_codetable) + 4095) & ~(size_t)4095)
#endif

int bi_store_init(void) {
    for (int i = 0; i < 2; i++) {
        bi_half *h = &bi.halves[i];
        if (h->samples == NULL) h->samples = map_anon(SAMPLES_BYTES);
        if (h->stacks == NULL) h->stacks = map_anon(STACKS_BYTES);
        if (h->frames == NULL) h->frames = map_anon(FRAMES_BYTES);
        if (h->samples == NULL || h->stacks == NULL || h->frames == NULL) return -1;
#ifdef ASPROF_WALKER
        if (h->codes == NULL) h->codes = map_anon(CODES_BYTES);
        if (h->codes == NULL) return -1;
#endif
    }
    return 0;
}

void bi_store_reset(bi_half *h) {
    if (h->samples == NULL) return;
    uint32_t used = atomic_load(&h->nsamples);
    if (used > BI_SAMPLE_CAP) used = BI_SAMPLE_CAP;
    if (used) madvise(h->samples, SAMPLES_BYTES, MADV_DONTNEED);
    if (atomic_load(&h->nstacks)) {
        madvise(h->stacks, STACKS_BYTES, MADV_DONTNEED);
        madvise(h->frames, FRAMES_BYTES, MADV_DONTNEED);
    }
#ifdef ASPROF_WALKER
    if (atomic_load(&h->codes->count) || atomic_load(&h->codes->arena_used))
        madvise(h->codes, CODES_BYTES, MADV_DONTNEED);
#endif
    atomic_store(&h->nsamples, 0);
    atomic_store(&h->nstacks, 0);
    atomic_store(&h->frames_used, 0);
    atomic_store(&h->lost, 0);
}

uint32_t bi_store_new_epoch(void) {
    uint32_t e = atomic_fetch_add(&epochs, 1) + 1;
    return e ? e : atomic_fetch_add(&epochs, 1) + 1;
}

bi_half *bi_store_swap(void) {
    int c = atomic_load(&bi.cur);
    bi_half *old = &bi.halves[c];
    atomic_store(&bi.halves[1 - c].epoch, bi_store_new_epoch());  /* before any handler can pin it */
    atomic_store(&bi.cur, 1 - c);  /* seq_cst: pairs with the handler's pin, then re-check */
    /* Handlers are bounded (a few microseconds); wait up to ~2 s for stragglers. */
    for (int i = 0; i < 40000; i++) {
        if (atomic_load(&old->pins) == 0) return old;
        struct timespec ts = {0, 50000};
        nanosleep(&ts, NULL);
    }
    /* Give up: handlers keep using the old half; the new one is drained next time. */
    atomic_store(&bi.cur, c);
    atomic_fetch_add(&bi.n.collect_timeouts, 1);
    return NULL;
}

/* Resident bytes of one mapping (mincore), 0 when unknown. */
static uint64_t resident(void *addr, size_t len) {
    if (addr == NULL) return 0;
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0) return 0;
    size_t pages = (len + (size_t)page - 1) / (size_t)page;
    unsigned char *vec = malloc(pages);
    if (vec == NULL) return 0;
    uint64_t n = 0;
    if (mincore(addr, len, vec) == 0)
        for (size_t i = 0; i < pages; i++) n += vec[i] & 1u;
    free(vec);
    return n * (uint64_t)page;
}

uint64_t bi_store_resident(void) {
    uint64_t n = 0;
    for (int i = 0; i < 2; i++) {
        bi_half *h = &bi.halves[i];
        n += resident(h->samples, SAMPLES_BYTES) + resident(h->stacks, STACKS_BYTES) + resident(h->frames, FRAMES_BYTES);
#ifdef ASPROF_WALKER
        n += resident(h->codes, CODES_BYTES);
#endif
    }
    return n;
}

void bi_store_quiesce(void) {
    /* after bi.enabled = 0 (seq_cst): a handler that pins from now on sees it and writes nothing */
    for (int i = 0; i < 20000; i++) {
        if (atomic_load(&bi.halves[0].pins) == 0 && atomic_load(&bi.halves[1].pins) == 0) return;
        struct timespec ts = {0, 50000};
        nanosleep(&ts, NULL);
    }
}
