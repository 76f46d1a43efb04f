/* pipewright — data set internals shared by data.c (IDX, synthetic, text,
 * specs, gather, checks) and data_tokens.c (llm.c token shards). */
#ifndef PW_STAGES_DATA_INTERNAL_H
#define PW_STAGES_DATA_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "stages/train/data.h"

/* Where the tokens of a token split came from: shard k gave stream tokens
 * [first[k], first[k + 1]) of the split, its own tokens from skip[k] on (the
 * held-out split may start inside a shard). */
struct pw_token_shards {
    int n;
    char **path;        /* (n) */
    int64_t *first;     /* (n + 1) */
    int64_t *skip;      /* (n) */
};

/* Frees the table; accepts NULL. */
void pw_token_shards_free(struct pw_token_shards *s);

/* Token i of a token data set's stream (d->tokens, d->token_width bytes). */
static inline uint32_t pw_token_at(const pw_dataset *d, int64_t i)
{
    return d->token_width == 2 ? ((const uint16_t *)d->tokens)[i] : ((const uint32_t *)d->tokens)[i];
}

/* The first input (stream ids [0, n·T)) or, with `labels`, the first target
 * (ids [1, n·T]) that is >= limit, described as "FILE: token ID at position
 * P (byte B)" into buf (P counts the shard's own ids from 0); returns 0 when
 * there is none (buf untouched). */
int pw_tokens_first_at_least(const pw_dataset *d, int labels, uint32_t limit, char *buf, size_t n);

/* Entropy in nats of a token set's targets (stream tokens [1, n·T]). */
double pw_tokens_entropy(const pw_dataset *d);

#endif
