/* What main.c shares with the test modes kept in files of their own. */
#ifndef FORKVM_TEST_GUEST_MODES_H
#define FORKVM_TEST_GUEST_MODES_H

#include "guest.h"

/* Finds `key=value` in the command line (the last one wins); 1 if found. */
int get_arg(const char *key, struct str *val);
int str_eq(struct str s, const char *lit);
/* Prints `msg` and ends the guest with exit code `code`. */
NORETURN void fail(const char *msg, uint32_t code);
/* Decimal or 0x-prefixed hex; ends the guest on malformed input, naming `what`. */
uint64_t parse_u64(struct str s, const char *what);

/* The kernel command line (PVH start info). */
const char *guest_cmdline(void);

NORETURN void mode_virtio_console(void);

#endif
