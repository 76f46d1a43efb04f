/* pipewright — the C11 atomics that public headers use (atomic_int,
 * atomic_llong, atomic_store_explicit, ...), for C and for C++.
 *
 *     #include "runtime/atomic.h"
 *     atomic_int stop = 0;                                     // C or C++
 *     atomic_store_explicit(&stop, 1, memory_order_relaxed);
 *
 * In C this is <stdatomic.h>. C++ before C++23 has no <stdatomic.h> of its
 * own (g++ with libstdc++ gives an empty one), so there the same names come
 * from <atomic>: atomic_int is std::atomic<int>, atomic_llong is
 * std::atomic<long long>, brought into the global namespace exactly as
 * C++23's <stdatomic.h> does. Both compilers lay std::atomic<T> out as
 * _Atomic T (checked below), so a struct with atomic members (pw_transport_state)
 * means the same thing to the C library and to a C++ caller. Where
 * <stdatomic.h> already gave the names (C++23, or clang's C header under
 * clang++), nothing is added.
 *
 * Ownership and threads: declarations only (no functions): the C11 atomic
 * types and operations under one spelling for C and C++.
 */
#ifndef PW_RUNTIME_ATOMIC_H
#define PW_RUNTIME_ATOMIC_H

#include <stdatomic.h>

#if defined(__cplusplus) && !defined(__cpp_lib_stdatomic_h) && !defined(atomic_store_explicit)
#include <atomic>

using std::atomic_int;
using std::atomic_llong;
using std::memory_order;
using std::memory_order_relaxed;
using std::memory_order_acquire;
using std::memory_order_release;
using std::memory_order_acq_rel;
using std::memory_order_seq_cst;
using std::atomic_load_explicit;
using std::atomic_store_explicit;
using std::atomic_fetch_add_explicit;

static_assert(sizeof(atomic_int) == sizeof(int) && alignof(atomic_int) == alignof(int),
              "pipewright: std::atomic<int> must be laid out as C's atomic_int");
static_assert(sizeof(atomic_llong) == 8 && alignof(atomic_llong) == 8,
              "pipewright: std::atomic<long long> must be laid out as C's atomic_llong");
#endif

#endif
