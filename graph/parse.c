/* pipewright — graph format v1: lexer and parser (text → statements), and the
 * public entry points pw_graph_parse_file / pw_graph_parse_string.
 *
 * The format is line-oriented: a statement ends at the end of its line. The
 * lexer validates every byte (ASCII outside comments, UTF-8 inside them, no
 * NUL or control bytes), the parser checks syntax, literals, op arity and
 * attributes; names, shapes and parameters are checked by lower.c. Recursion
 * is bounded by the repeat nesting limit (PW_GRAPH_MAX_DEPTH).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "graph/graph-internal.h"

/* ------------------------------------------------------------------ lexer */

typedef enum tok_kind {
    TK_EOF = 0,
    TK_NL,
    TK_NAME,   /* identifier or dotted path: blocks.0.fc */
    TK_INT,
    TK_FLOAT,
    TK_EQ,
    TK_LPAREN,
    TK_RPAREN,
    TK_COMMA,
    TK_LBRACK,
    TK_RBRACK,
    TK_LBRACE,
    TK_RBRACE,
    TK_COLON,
    TK_MINUS,
} tok_kind;

typedef struct token {
    tok_kind k;
    pw_pos pos;
    const char *s; /* points into the source */
    size_t n;
    int64_t i;     /* TK_INT */
    double f;      /* TK_FLOAT */
} token;

typedef struct parser {
    const char *src;
    size_t len, at;
    int line;
    size_t line_start;
    const char *file;
    pw_pool *pool;
    token tok, ahead; /* current token and one of lookahead */
    int have_ahead;
    int depth;        /* repeat nesting */
} parser;

static int is_alpha(int c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
static int is_digit(int c) { return c >= '0' && c <= '9'; }
static int is_word(int c) { return is_alpha(c) || is_digit(c); }

static pw_pos here(const parser *p)
{
    pw_pos pos = {p->line, (int)(p->at - p->line_start) + 1};
    return pos;
}

/* Length of the valid UTF-8 sequence at s (n bytes available), 0 if invalid. */
static size_t utf8_len(const unsigned char *s, size_t n, unsigned *cp)
{
    unsigned c = s[0];
    size_t len;
    unsigned min;
    if (c < 0x80) {
        *cp = c;
        return 1;
    } else if (c >= 0xc2 && c <= 0xdf) {
        len = 2, min = 0x80, *cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3, min = 0x800, *cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4, min = 0x10000, *cp = c & 0x07;
    } else {
        return 0;
    }
    if (n < len) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        *cp = (*cp << 6) | (s[i] & 0x3f);
    }
    if (*cp < min || *cp > 0x10ffff || (*cp >= 0xd800 && *cp <= 0xdfff)) return 0;
    return len;
}

/* The error for a byte the format does not allow at this place. */
static pw_status bad_char(parser *p, int in_comment)
{
    const unsigned char *s = (const unsigned char *)p->src + p->at;
    unsigned cp;
    pw_pos pos = here(p);
    if (s[0] == 0)
        return pw_graph_err(PW_ERR_PARSE, p->file, pos, "unexpected character NUL (byte 0x00)");
    if (s[0] < 0x20 || s[0] == 0x7f)
        return pw_graph_err(PW_ERR_PARSE, p->file, pos,
                            "unexpected character 0x%02x (control character)", s[0]);
    if (s[0] >= 0x80) {
        if (in_comment || utf8_len(s, p->len - p->at, &cp) == 0)
            return pw_graph_err(PW_ERR_PARSE, p->file, pos,
                                "unexpected character (byte 0x%02x is not valid UTF-8)", s[0]);
        return pw_graph_err(PW_ERR_PARSE, p->file, pos,
                            "unexpected character U+%04X (only ASCII is allowed outside comments)",
                            cp);
    }
    return pw_graph_err(PW_ERR_PARSE, p->file, pos, "unexpected character '%c'", s[0]);
}

static pw_status lex_number(parser *p, token *t)
{
    const char *s = p->src;
    size_t i = p->at, start = p->at;
    int is_float = 0;
    while (i < p->len && is_digit(s[i])) i++;
    if (i + 1 < p->len && s[i] == '.' && is_digit(s[i + 1])) {
        is_float = 1;
        i++;
        while (i < p->len && is_digit(s[i])) i++;
    }
    if (i < p->len && (s[i] == 'e' || s[i] == 'E')) {
        size_t j = i + 1;
        if (j < p->len && (s[j] == '+' || s[j] == '-')) j++;
        if (j < p->len && is_digit(s[j])) {
            is_float = 1;
            i = j;
            while (i < p->len && is_digit(s[i])) i++;
        }
    }
    t->pos = here(p);
    if (i < p->len && (is_word(s[i]) || s[i] == '.'))
        return pw_graph_err(PW_ERR_PARSE, p->file, t->pos, "malformed number '%.*s'",
                            (int)(i - start + 1 > 40 ? 40 : i - start + 1), s + start);
    if (i - start > 64)
        return pw_graph_err(PW_ERR_PARSE, p->file, t->pos,
                            "number literal too long (%zu characters; the limit is 64)", i - start);
    t->s = s + start;
    t->n = i - start;
    if (is_float) {
        char buf[80];
        memcpy(buf, t->s, t->n);
        buf[t->n] = '\0';
        t->k = TK_FLOAT;
        t->f = strtod(buf, NULL);
    } else {
        int64_t v = 0;
        for (size_t k = start; k < i; k++) {
            int d = s[k] - '0';
            if (v > (INT64_MAX - d) / 10)
                return pw_graph_err(PW_ERR_PARSE, p->file, t->pos,
                                    "integer literal '%.*s' is too large",
                                    (int)(t->n > 40 ? 40 : t->n), t->s);
            v = v * 10 + d;
        }
        t->k = TK_INT;
        t->i = v;
    }
    p->at = i;
    return PW_OK;
}

static pw_status lex(parser *p, token *t)
{
    const char *s = p->src;
    memset(t, 0, sizeof *t);
    for (;;) {
        if (p->at >= p->len) {
            t->k = TK_EOF;
            t->pos = here(p);
            return PW_OK;
        }
        unsigned char c = (unsigned char)s[p->at];
        if (c == ' ' || c == '\t' || c == '\r') {
            p->at++;
        } else if (c == '#') {
            /* Comments may hold any UTF-8 text, but no NUL or control bytes. */
            while (p->at < p->len && s[p->at] != '\n') {
                unsigned char b = (unsigned char)s[p->at];
                unsigned cp;
                if (b >= 0x80) {
                    size_t n = utf8_len((const unsigned char *)s + p->at, p->len - p->at, &cp);
                    if (n == 0) return bad_char(p, 1);
                    p->at += n;
                } else if ((b < 0x20 && b != '\t' && b != '\r') || b == 0x7f) {
                    return bad_char(p, 1);
                } else {
                    p->at++;
                }
            }
        } else {
            break;
        }
    }

    unsigned char c = (unsigned char)s[p->at];
    t->pos = here(p);
    t->s = s + p->at;
    t->n = 1;
    if (c == '\n') {
        t->k = TK_NL;
        p->at++;
        p->line++;
        p->line_start = p->at;
        return PW_OK;
    }
    if (is_alpha(c)) {
        /* identifier ('.' [A-Za-z0-9_]+)* */
        size_t i = p->at;
        for (;;) {
            while (i < p->len && is_word(s[i])) i++;
            if (i + 1 < p->len && s[i] == '.' && is_word(s[i + 1]))
                i++;
            else
                break;
        }
        t->k = TK_NAME;
        t->n = i - p->at;
        if (t->n > PW_GRAPH_MAX_NAME)
            return pw_graph_err(PW_ERR_PARSE, p->file, t->pos,
                                "name too long (%zu characters; the limit is %d)", t->n,
                                PW_GRAPH_MAX_NAME);
        p->at = i;
        return PW_OK;
    }
    if (is_digit(c)) return lex_number(p, t);
    switch (c) {
    case '=': t->k = TK_EQ; break;
    case '(': t->k = TK_LPAREN; break;
    case ')': t->k = TK_RPAREN; break;
    case ',': t->k = TK_COMMA; break;
    case '[': t->k = TK_LBRACK; break;
    case ']': t->k = TK_RBRACK; break;
    case '{': t->k = TK_LBRACE; break;
    case '}': t->k = TK_RBRACE; break;
    case ':': t->k = TK_COLON; break;
    case '-': t->k = TK_MINUS; break;
    default: return bad_char(p, 0);
    }
    p->at++;
    return PW_OK;
}

/* ------------------------------------------------------------------ token helpers */

static pw_status advance(parser *p)
{
    if (p->have_ahead) {
        p->tok = p->ahead;
        p->have_ahead = 0;
        return PW_OK;
    }
    return lex(p, &p->tok);
}

static pw_status peek(parser *p, const token **t)
{
    if (!p->have_ahead) {
        PW_CHECK(lex(p, &p->ahead));
        p->have_ahead = 1;
    }
    *t = &p->ahead;
    return PW_OK;
}

static const char *tok_desc(const token *t, char *buf, size_t n)
{
    int len = (int)(t->n > 40 ? 40 : t->n);
    const char *dots = t->n > 40 ? "..." : "";
    switch (t->k) {
    case TK_EOF: return "end of file";
    case TK_NL: return "end of line";
    case TK_NAME: snprintf(buf, n, "'%.*s%s'", len, t->s, dots); return buf;
    case TK_INT:
    case TK_FLOAT: snprintf(buf, n, "number %.*s%s", len, t->s, dots); return buf;
    default: snprintf(buf, n, "'%c'", t->s[0]); return buf;
    }
}

static pw_status expected(parser *p, const char *what)
{
    char buf[64];
    return pw_graph_err(PW_ERR_PARSE, p->file, p->tok.pos, "expected %s, got %s", what,
                        tok_desc(&p->tok, buf, sizeof buf));
}

static int tok_is(const token *t, const char *word)
{
    return t->k == TK_NAME && strlen(word) == t->n && memcmp(t->s, word, t->n) == 0;
}

static const char *const keywords[] = {"graph", "input", "label", "cut", "repeat",
                                       "as", "return", "true", "false"};

static int is_keyword(const token *t)
{
    for (size_t i = 0; i < sizeof keywords / sizeof keywords[0]; i++)
        if (tok_is(t, keywords[i])) return 1;
    return 0;
}

static pw_status expect(parser *p, tok_kind k, const char *what)
{
    if (p->tok.k != k) return expected(p, what);
    return advance(p);
}

static pw_status dup_tok(parser *p, const token *t, const char **out)
{
    *out = pw_pool_strndup(p->pool, t->s, t->n);
    if (!*out) return pw_error(PW_ERR_NOMEM, "out of memory parsing %s", p->file);
    return PW_OK;
}

/* A value name, parameter path or graph name; keywords are refused. */
static pw_status take_name(parser *p, const char *what, const char **out, pw_pos *pos)
{
    if (p->tok.k != TK_NAME) return expected(p, what);
    if (is_keyword(&p->tok))
        return pw_graph_err(PW_ERR_PARSE, p->file, p->tok.pos,
                            "'%.*s' is a keyword and cannot be used as %s", (int)p->tok.n,
                            p->tok.s, what);
    if (pos) *pos = p->tok.pos;
    PW_CHECK(dup_tok(p, &p->tok, out));
    return advance(p);
}

/* ------------------------------------------------------------------ statements */

static pw_status parse_block(parser *p, pw_ast_block *out, int in_body, pw_pos lbrace);

/* TYPE := ('f32' | 'i32') '[' [INT {',' INT}] ']' */
static pw_status parse_type(parser *p, pw_ast_stmt *st)
{
    char buf[64];
    st->type_pos = p->tok.pos;
    if (p->tok.k != TK_NAME) return expected(p, "a dtype (f32 or i32)");
    if (tok_is(&p->tok, "f32"))
        st->dtype = PW_F32;
    else if (tok_is(&p->tok, "i32"))
        st->dtype = PW_I32;
    else
        return pw_graph_err(PW_ERR_PARSE, p->file, p->tok.pos,
                            "unknown dtype %s (expected f32 or i32)",
                            tok_desc(&p->tok, buf, sizeof buf));
    PW_CHECK(advance(p));
    pw_pos lb = p->tok.pos;
    PW_CHECK(expect(p, TK_LBRACK, "'[' after the dtype (write f32[] for a scalar)"));
    int64_t numel = 1;
    st->shape.ndim = 0;
    while (p->tok.k != TK_RBRACK) {
        if (st->shape.ndim > 0) PW_CHECK(expect(p, TK_COMMA, "',' or ']'"));
        if (p->tok.k == TK_MINUS) {
            return pw_graph_err(PW_ERR_SHAPE, p->file, p->tok.pos,
                                "dimension must be positive, got a negative number");
        }
        if (p->tok.k != TK_INT) return expected(p, st->shape.ndim ? "a dimension" :
                                                "a dimension or ']'");
        if (p->tok.i <= 0)
            return pw_graph_err(PW_ERR_SHAPE, p->file, p->tok.pos,
                                "dimension must be positive, got %lld", (long long)p->tok.i);
        if (st->shape.ndim == PW_MAX_DIMS)
            return pw_graph_err(PW_ERR_SHAPE, p->file, p->tok.pos,
                                "too many dimensions (the limit is %d)", PW_MAX_DIMS);
        if (pw_graph_mul_checked(numel, p->tok.i, &numel) != 0)
            return pw_graph_err(PW_ERR_SHAPE, p->file, lb,
                                "shape has more than 2^40 elements");
        st->shape.d[st->shape.ndim++] = p->tok.i;
        PW_CHECK(advance(p));
    }
    return advance(p);
}

static pw_status parse_int_list(parser *p, pw_attr_value *v)
{
    PW_CHECK(advance(p)); /* '[' */
    v->kind = PW_ATTR_INTS;
    v->n = 0;
    while (p->tok.k != TK_RBRACK) {
        int neg = 0;
        if (v->n > 0) PW_CHECK(expect(p, TK_COMMA, "',' or ']'"));
        if (p->tok.k == TK_MINUS) {
            neg = 1;
            PW_CHECK(advance(p));
        }
        if (p->tok.k != TK_INT) return expected(p, "an integer");
        if (v->n == PW_GRAPH_MAX_LIST)
            return pw_graph_err(PW_ERR_PARSE, p->file, p->tok.pos,
                                "list too long (the limit is %d elements)", PW_GRAPH_MAX_LIST);
        v->list[v->n++] = neg ? -p->tok.i : p->tok.i;
        PW_CHECK(advance(p));
    }
    return advance(p);
}

/* VALUE := ['-'] INT | ['-'] FLOAT | true | false | PATH | '[' ints ']' */
static pw_status parse_attr_value(parser *p, pw_attr_value *v)
{
    int neg = 0;
    memset(v, 0, sizeof *v);
    if (p->tok.k == TK_LBRACK) return parse_int_list(p, v);
    if (p->tok.k == TK_MINUS) {
        neg = 1;
        PW_CHECK(advance(p));
        if (p->tok.k != TK_INT && p->tok.k != TK_FLOAT) return expected(p, "a number after '-'");
    }
    switch (p->tok.k) {
    case TK_INT:
        v->kind = PW_ATTR_INT;
        v->i = neg ? -p->tok.i : p->tok.i;
        v->f = (double)v->i;
        break;
    case TK_FLOAT:
        v->kind = PW_ATTR_FLOAT;
        v->f = neg ? -p->tok.f : p->tok.f;
        break;
    case TK_NAME:
        if (tok_is(&p->tok, "true") || tok_is(&p->tok, "false")) {
            v->kind = PW_ATTR_BOOL;
            v->b = tok_is(&p->tok, "true");
        } else {
            v->kind = PW_ATTR_NAME;
            PW_CHECK(dup_tok(p, &p->tok, &v->s));
        }
        break;
    default:
        return expected(p, "an attribute value");
    }
    return advance(p);
}

/* KEY '=' VALUE, checked against the op's table entry. */
static pw_status parse_attr(parser *p, pw_ast_stmt *st)
{
    const pw_op_spec *spec = st->op;
    pw_ast_attr a;
    char msg[512], list[128] = "";
    memset(&a, 0, sizeof a);
    a.key_pos = p->tok.pos;
    PW_CHECK(dup_tok(p, &p->tok, &a.key));
    const pw_attr_spec *as = pw_op_attr_find(spec, a.key);
    if (!as) {
        const char *best = NULL;
        for (int i = 0; i < spec->n_attrs; i++) {
            size_t off = strlen(list);
            snprintf(list + off, sizeof list - off, "%s%s", i ? ", " : "", spec->attrs[i].key);
            if (!best && pw_edit_distance(a.key, spec->attrs[i].key, 2) <= 2)
                best = spec->attrs[i].key;
        }
        if (spec->n_attrs == 0)
            return pw_graph_err(PW_ERR_PARSE, p->file, a.key_pos,
                                "%s has no attribute '%s' (it takes none)", spec->name, a.key);
        if (best)
            return pw_graph_err(PW_ERR_PARSE, p->file, a.key_pos,
                                "%s has no attribute '%s'; did you mean '%s'?", spec->name,
                                a.key, best);
        return pw_graph_err(PW_ERR_PARSE, p->file, a.key_pos,
                            "%s has no attribute '%s' (its attributes are: %s)", spec->name,
                            a.key, list);
    }
    for (int i = 0; i < st->n_attrs; i++)
        if (strcmp(st->attrs[i].key, a.key) == 0)
            return pw_graph_err(PW_ERR_PARSE, p->file, a.key_pos,
                                "duplicate attribute '%s' (first given at %d:%d)", a.key,
                                st->attrs[i].key_pos.line, st->attrs[i].key_pos.col);
    PW_CHECK(advance(p));
    PW_CHECK(expect(p, TK_EQ, "'='"));
    a.val_pos = p->tok.pos;
    PW_CHECK(parse_attr_value(p, &a.v));
    pw_status st2 = pw_op_set_attr(spec, as, &a.v, &st->node_attrs, msg, sizeof msg);
    if (st2 != PW_OK) return pw_graph_err(st2, p->file, a.val_pos, "%s", msg);
    /* Every attribute is known and distinct, so n_attrs ≤ spec->n_attrs. */
    st->attrs[st->n_attrs++] = a;
    return PW_OK;
}

/* OP '(' NAME {',' NAME} {',' KEY '=' VALUE} ')' [as PATH] */
static pw_status parse_call(parser *p, pw_ast_stmt *st)
{
    char name[PW_GRAPH_MAX_NAME + 1];
    const token *nx;
    st->kind = PW_ST_OP;
    st->op_pos = p->tok.pos;
    PW_CHECK(peek(p, &nx));
    if (nx->k != TK_LPAREN) {
        char buf[64];
        return pw_graph_err(PW_ERR_PARSE, p->file, nx->pos,
                            "expected '(' after op name '%.*s', got %s (a value cannot be "
                            "renamed; use it directly)",
                            (int)p->tok.n, p->tok.s, tok_desc(nx, buf, sizeof buf));
    }
    memcpy(name, p->tok.s, p->tok.n);
    name[p->tok.n] = '\0';
    st->op = pw_op_find(name);
    if (!st->op) {
        const char *best = pw_op_suggest(name);
        if (best)
            return pw_graph_err(PW_ERR_PARSE, p->file, st->op_pos,
                                "unknown op '%s'; did you mean '%s'?", name, best);
        char list[512] = "";
        for (int k = 0; k < PW_OP_COUNT; k++) {
            size_t off = strlen(list);
            snprintf(list + off, sizeof list - off, "%s%s", k ? ", " : "",
                     pw_op_name((pw_op_kind)k));
        }
        return pw_graph_err(PW_ERR_PARSE, p->file, st->op_pos, "unknown op '%s' (ops: %s)",
                            name, list);
    }
    pw_op_default_attrs(st->op->op, &st->node_attrs);
    PW_CHECK(advance(p));
    PW_CHECK(expect(p, TK_LPAREN, "'(' after the op name"));
    while (p->tok.k != TK_RPAREN) {
        if (st->n_args + st->n_attrs > 0) PW_CHECK(expect(p, TK_COMMA, "',' or ')'"));
        if (p->tok.k != TK_NAME)
            return expected(p, st->n_args + st->n_attrs ? "an argument or attribute"
                                                        : "an argument or ')'");
        PW_CHECK(peek(p, &nx));
        if (nx->k == TK_EQ) {
            PW_CHECK(parse_attr(p, st));
            continue;
        }
        if (st->n_attrs > 0)
            return pw_graph_err(PW_ERR_PARSE, p->file, p->tok.pos,
                                "positional argument after attributes");
        if (st->n_args == PW_MAX_OP_INPUTS)
            return pw_graph_err(PW_ERR_PARSE, p->file, p->tok.pos,
                                "%s: too many arguments", st->op->name);
        PW_CHECK(take_name(p, "a value name", &st->args[st->n_args], &st->arg_pos[st->n_args]));
        st->n_args++;
    }
    pw_pos close = p->tok.pos;
    PW_CHECK(advance(p));
    if (st->n_args != st->op->n_inputs)
        return pw_graph_err(PW_ERR_PARSE, p->file, st->n_args > st->op->n_inputs
                                                       ? st->arg_pos[st->op->n_inputs]
                                                       : close,
                            "%s takes %d argument%s, got %d", st->op->name, st->op->n_inputs,
                            st->op->n_inputs == 1 ? "" : "s", st->n_args);
    for (int i = 0; i < st->op->n_attrs; i++) {
        const pw_attr_spec *as = &st->op->attrs[i];
        int given = 0;
        for (int k = 0; k < st->n_attrs; k++) given |= strcmp(st->attrs[k].key, as->key) == 0;
        if (as->required && !given)
            return pw_graph_err(PW_ERR_PARSE, p->file, st->op_pos,
                                "%s: missing required attribute '%s'", st->op->name, as->key);
    }
    if (tok_is(&p->tok, "as")) {
        PW_CHECK(advance(p));
        PW_CHECK(take_name(p, "a parameter path after 'as'", &st->as_path, &st->as_pos));
    }
    return PW_OK;
}

/* repeat N [as PATH] '(' NAME '=' NAME ')' '{' NL body '}' */
static pw_status parse_repeat(parser *p, pw_ast_stmt *st)
{
    pw_pos rp = p->tok.pos;
    st->kind = PW_ST_REPEAT;
    PW_CHECK(advance(p));
    if (p->tok.k == TK_MINUS || (p->tok.k == TK_INT && (p->tok.i < 1 ||
                                                         p->tok.i > PW_GRAPH_MAX_REPEAT))) {
        const token *nx = &p->tok;
        long long v = p->tok.i;
        if (p->tok.k == TK_MINUS) {
            PW_CHECK(peek(p, &nx));
            v = nx->k == TK_INT ? -nx->i : 0;
        }
        return pw_graph_err(PW_ERR_PARSE, p->file, p->tok.pos,
                            "repeat count must be between 1 and %d, got %lld",
                            PW_GRAPH_MAX_REPEAT, v);
    }
    if (p->tok.k != TK_INT) return expected(p, "a repeat count");
    st->count = p->tok.i;
    PW_CHECK(advance(p));
    if (tok_is(&p->tok, "as")) {
        PW_CHECK(advance(p));
        PW_CHECK(take_name(p, "a parameter path after 'as'", &st->as_path, &st->as_pos));
    }
    PW_CHECK(expect(p, TK_LPAREN, "'(' and the carried value, as in (b = x)"));
    PW_CHECK(take_name(p, "the name of the carried value", &st->carry, &st->carry_pos));
    PW_CHECK(expect(p, TK_EQ, "'='"));
    PW_CHECK(take_name(p, "the carried value's initial value", &st->init, &st->init_pos));
    PW_CHECK(expect(p, TK_RPAREN, "')'"));
    pw_pos lbrace = p->tok.pos;
    PW_CHECK(expect(p, TK_LBRACE, "'{'"));
    if (p->tok.k != TK_NL) return expected(p, "end of line after '{'");
    if (p->depth + 1 > PW_GRAPH_MAX_DEPTH)
        return pw_graph_err(PW_ERR_PARSE, p->file, rp,
                            "repeats nested too deeply (the limit is %d)", PW_GRAPH_MAX_DEPTH);
    p->depth++;
    pw_status s = parse_block(p, &st->body, 1, lbrace);
    p->depth--;
    return s;
}

static pw_status parse_stmt(parser *p, pw_ast_stmt *st, int in_body, int index)
{
    char buf[64];
    const char *where = in_body ? "inside a repeat body" : NULL;
    st->pos = p->tok.pos;
    if (p->tok.k != TK_NAME)
        return pw_graph_err(PW_ERR_PARSE, p->file, p->tok.pos, "expected a statement, got %s",
                            tok_desc(&p->tok, buf, sizeof buf));
    if (tok_is(&p->tok, "graph")) {
        if (in_body || index > 0)
            return pw_graph_err(PW_ERR_PARSE, p->file, p->tok.pos,
                                "'graph' must be the first statement of the file");
        st->kind = PW_ST_GRAPH;
        PW_CHECK(advance(p));
        return take_name(p, "the graph's name", &st->name, &st->name_pos);
    }
    if (tok_is(&p->tok, "input") || tok_is(&p->tok, "label")) {
        int is_input = tok_is(&p->tok, "input");
        if (where)
            return pw_graph_err(PW_ERR_PARSE, p->file, p->tok.pos,
                                "'%s' is not allowed %s", is_input ? "input" : "label", where);
        st->kind = is_input ? PW_ST_INPUT : PW_ST_LABEL;
        PW_CHECK(advance(p));
        PW_CHECK(take_name(p, is_input ? "the input's name" : "the label's name", &st->name,
                           &st->name_pos));
        PW_CHECK(expect(p, TK_COLON, "':' and a type, as in f32[1, 28, 28]"));
        return parse_type(p, st);
    }
    if (tok_is(&p->tok, "cut")) {
        st->kind = PW_ST_CUT;
        return advance(p);
    }
    if (tok_is(&p->tok, "return")) {
        if (!in_body)
            return pw_graph_err(PW_ERR_PARSE, p->file, p->tok.pos,
                                "'return' outside a repeat body");
        st->kind = PW_ST_RETURN;
        PW_CHECK(advance(p));
        return take_name(p, "the value to return", &st->name, &st->name_pos);
    }
    if (is_keyword(&p->tok))
        return pw_graph_err(PW_ERR_PARSE, p->file, p->tok.pos, "expected a statement, got %s",
                            tok_desc(&p->tok, buf, sizeof buf));
    PW_CHECK(take_name(p, "a value name", &st->name, &st->name_pos));
    PW_CHECK(expect(p, TK_EQ, "'=' after the value name"));
    if (p->tok.k != TK_NAME) return expected(p, "an op name or 'repeat'");
    if (tok_is(&p->tok, "repeat")) return parse_repeat(p, st);
    return parse_call(p, st);
}

/* Statements until end of file (top level) or the closing '}' (a body). */
static pw_status parse_block(parser *p, pw_ast_block *out, int in_body, pw_pos lbrace)
{
    pw_ast_stmt **tail = &out->first, *last = NULL;
    char buf[64];
    for (;;) {
        while (p->tok.k == TK_NL) PW_CHECK(advance(p));
        if (p->tok.k == TK_EOF) {
            if (in_body)
                return pw_graph_err(PW_ERR_PARSE, p->file, lbrace,
                                    "unterminated '{': the repeat body has no closing '}'");
            return PW_OK;
        }
        if (p->tok.k == TK_RBRACE) {
            if (!in_body)
                return pw_graph_err(PW_ERR_PARSE, p->file, p->tok.pos,
                                    "'}' without a matching repeat '{'");
            if (!last || last->kind != PW_ST_RETURN)
                return pw_graph_err(PW_ERR_PARSE, p->file, p->tok.pos,
                                    "repeat body must end with 'return VALUE'");
            return advance(p);
        }
        if (last && last->kind == PW_ST_RETURN)
            return pw_graph_err(PW_ERR_PARSE, p->file, p->tok.pos,
                                "statement after 'return' ('return' must be the last "
                                "statement of a repeat body)");
        pw_ast_stmt *st = pw_pool_alloc(p->pool, sizeof *st);
        if (!st) return pw_error(PW_ERR_NOMEM, "out of memory parsing %s", p->file);
        PW_CHECK(parse_stmt(p, st, in_body, out->n));
        *tail = last = st;
        tail = &st->next;
        out->n++;
        if (p->tok.k == TK_NL || p->tok.k == TK_EOF || (in_body && p->tok.k == TK_RBRACE))
            continue;
        return pw_graph_err(PW_ERR_PARSE, p->file, p->tok.pos,
                            "expected end of line after the statement, got %s",
                            tok_desc(&p->tok, buf, sizeof buf));
    }
}

pw_status pw_graph_parse_ast(const char *text, size_t len, const char *file, pw_pool *pool,
                             pw_ast_block *top)
{
    parser p;
    memset(&p, 0, sizeof p);
    p.src = text ? text : "";
    p.len = text ? len : 0;
    p.line = 1;
    p.file = file;
    p.pool = pool;
    memset(top, 0, sizeof *top);
    /* A UTF-8 byte-order mark is skipped (columns still count it). */
    if (p.len >= 3 && memcmp(p.src, "\xef\xbb\xbf", 3) == 0) p.at = 3;
    PW_CHECK(advance(&p));
    pw_pos none = {1, 1};
    return parse_block(&p, top, 0, none);
}

/* ------------------------------------------------------------------ entry points */

/* "dir/fashion_mlp.graph" → "fashion_mlp" */
static void base_name(const char *path, char *out, size_t n)
{
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    size_t len = strlen(b);
    const char *dot = strrchr(b, '.');
    if (dot && dot != b) len = (size_t)(dot - b);
    if (len == 0) {
        b = "graph";
        len = 5;
    }
    if (len >= n) len = n - 1;
    memcpy(out, b, len);
    out[len] = '\0';
}

pw_status pw_graph_parse_string(const char *text, size_t len, const char *filename,
                                pw_graph **out)
{
    char name[256];
    pw_pool pool = {0};
    pw_ast_block top;
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_graph_parse_string: out is NULL");
    *out = NULL;
    if (!text && len > 0)
        return pw_error(PW_ERR_INVALID_ARG, "pw_graph_parse_string: text is NULL");
    const char *file = filename ? filename : "<string>";
    if (len > PW_GRAPH_MAX_FILE)
        return pw_error(PW_ERR_PARSE, "%s: graph text too large (%zu bytes; the limit is %zu)",
                        file, len, PW_GRAPH_MAX_FILE);
    base_name(filename ? filename : "graph", name, sizeof name);
    pw_status st = pw_graph_parse_ast(text, len, file, &pool, &top);
    if (st == PW_OK) st = pw_graph_lower(&top, file, name, out);
    pw_pool_free(&pool);
    return st;
}

pw_status pw_graph_parse_file(const char *path, pw_graph **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_graph_parse_file: out is NULL");
    *out = NULL;
    if (!path) return pw_error(PW_ERR_INVALID_ARG, "pw_graph_parse_file: path is NULL");
    FILE *f = fopen(path, "rb");
    if (!f) return pw_error(PW_ERR_IO, "%s: %s", path, strerror(errno));
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    pw_status st = PW_OK;
    if (!buf) {
        fclose(f);
        return pw_error(PW_ERR_NOMEM, "%s: out of memory", path);
    }
    for (;;) {
        if (len == cap) {
            if (cap > PW_GRAPH_MAX_FILE) {
                st = pw_error(PW_ERR_IO, "%s: file too large (the limit is %zu bytes)", path,
                              PW_GRAPH_MAX_FILE);
                break;
            }
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                st = pw_error(PW_ERR_NOMEM, "%s: out of memory", path);
                break;
            }
            buf = nb;
            cap *= 2;
        }
        size_t n = fread(buf + len, 1, cap - len, f);
        len += n;
        if (n == 0) {
            if (ferror(f)) st = pw_error(PW_ERR_IO, "%s: %s", path, strerror(errno));
            break;
        }
    }
    fclose(f);
    if (st == PW_OK) st = pw_graph_parse_string(buf, len, path, out);
    free(buf);
    return st;
}
