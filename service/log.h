/*
 * log: one line per event on stderr or a log file. The level is checked
 * before the arguments are evaluated (redis serverLog), and every line
 * carries the function that wrote it (OpenSSH error_f). Never pass content,
 * PINs or keys.
 */
#ifndef SMIMED_LOG_H
#define SMIMED_LOG_H

#include "service/config.h"

extern log_level log_current_level;

/* NULL path: stderr. -1 (and stderr) when the file cannot be opened. */
int log_open(const char *path, log_level level);
/* Reopens the file after rotation (SIGUSR1). */
int log_reopen(void);
/* The log file's descriptor, for a confined worker that cannot open the
 * file itself (the supervisor passes it with PROC_CTL_REOPEN); -1 when
 * logging to stderr. Borrowed. */
int log_file_fd(void);
/* Takes fd (always) as the log file after rotation, when logging to a
 * file; closes it otherwise. */
void log_take_fd(int fd);
void log_close(void);

__attribute__((format(printf, 3, 4))) void
log_write(log_level level, const char *func, const char *fmt, ...);

#define log_at(level, ...)                                                     \
    do {                                                                       \
        if ((int)(level) <=                                                    \
            (int)__atomic_load_n(&log_current_level, __ATOMIC_RELAXED))        \
            log_write((level), __func__, __VA_ARGS__);                         \
    } while (0)

#define log_error(...) log_at(LOG_LEVEL_ERROR, __VA_ARGS__)
#define log_warn(...) log_at(LOG_LEVEL_WARN, __VA_ARGS__)
#define log_info(...) log_at(LOG_LEVEL_INFO, __VA_ARGS__)
#define log_debug(...) log_at(LOG_LEVEL_DEBUG, __VA_ARGS__)

#endif
