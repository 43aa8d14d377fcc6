/* Shared between the core's C files; not part of its interface. */
#ifndef ASPROF_CORE_INTERNAL_H
#define ASPROF_CORE_INTERNAL_H
#include <pthread.h>
#include "asprof_core.h"

extern pthread_mutex_t asp_exec_lock;
extern int asp_log_fd;
int asp_buf_append(asp_buf *b, const char *data, size_t n);
#endif
