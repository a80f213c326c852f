/*
 * fastopt/xla_ffi.h - the part of XLA's FFI C interface that fastopt's custom-call handlers
 * (kernels/cpu/xla_loops.h) touch, in fastopt's own declarations.
 *
 * XLA (jaxlib) runs a typed-FFI custom call by handing the registered C function one call
 * frame (buffers, attributes, the API's function table) and taking back NULL or an error
 * object. That layout, the enum values and the version numbers are XLA's stable binary
 * interface, defined by xla/ffi/api/c_api.h in jaxlib's headers. fastopt builds without jax,
 * so it declares the pieces it reads or writes itself, under fo_xla_ / FO_XLA_ names that
 * cannot clash with XLA's: tests/test_jax_ffi.py compiles a file that includes both headers
 * and checks every size, member offset and enum value below against jaxlib's.
 *
 * Every struct that crosses the interface starts with its size, counted up to its last
 * member the sender knows of (FO_XLA_STRUCT_SIZE): a handler reads a member only when the
 * size covers it, and a newer XLA can append members without breaking older handlers.
 */
#ifndef FASTOPT_XLA_FFI_H
#define FASTOPT_XLA_FFI_H

#include <stddef.h>
#include <stdint.h>

/* The FFI API version these declarations follow, that of jaxlib 0.10. A handler reports it
   when XLA registers it, and XLA refuses handlers outside the range it supports (jaxlib
   0.10.2: 0.1 to 0.3); the layouts below are checked against headers of this version. */
#define FO_XLA_API_MAJOR 0
#define FO_XLA_API_MINOR 3

/* A struct's size as XLA counts it: up to the end of `member`, without tail padding */
#define FO_XLA_STRUCT_SIZE(type, member) \
    (offsetof(type, member) + sizeof(((type *)0)->member))

/* -- extensions: a linked list of optional records hung on a struct ------------------- */

typedef enum {
    FO_XLA_EXTENSION_METADATA = 1 /* XLA asks a handler for its metadata at registration */
} fo_xla_extension_type;

typedef struct fo_xla_extension_base {
    size_t struct_size;
    fo_xla_extension_type type;
    struct fo_xla_extension_base *next;
} fo_xla_extension_base;

typedef struct {
    size_t struct_size;
    fo_xla_extension_base *extension_start;
    int major_version;
    int minor_version;
} fo_xla_api_version;

/* -- errors: a handler returns NULL on success, else an error made by the API --------- */

typedef struct fo_xla_error fo_xla_error; /* opaque, owned by XLA once returned */

typedef enum {
    FO_XLA_ERROR_INVALID_ARGUMENT = 3,
    FO_XLA_ERROR_RESOURCE_EXHAUSTED = 8
} fo_xla_error_code;

typedef struct {
    size_t struct_size;
    fo_xla_extension_base *extension_start;
    const char *message; /* copied by XLA: a stack buffer is fine */
    fo_xla_error_code errc;
} fo_xla_error_create_args;

typedef fo_xla_error *fo_xla_error_create_fn(fo_xla_error_create_args *args);

/*
 * The API's function table (XLA_FFI_Api), declared only up to the first function, the
 * error constructor, which is all the handlers call. XLA owns the full struct and passes a
 * pointer to it; C lays members out in declaration order, each at the next offset its
 * alignment allows, so the leading members sit at the same offsets in this prefix as in the
 * full table. Never copied or sized here: sizeof(fo_xla_api) is not XLA's.
 */
typedef struct {
    size_t struct_size;
    fo_xla_extension_base *extension_start;
    fo_xla_api_version api_version;
    const void *internal_api;
    fo_xla_error_create_fn *error_create;
} fo_xla_api;

/* -- data types (xla::PrimitiveType numbers): those the handlers accept or name ------- */

typedef enum {
    FO_XLA_S32 = 4,
    FO_XLA_S64 = 5,
    FO_XLA_U8 = 6,
    FO_XLA_F16 = 10,
    FO_XLA_F32 = 11,
    FO_XLA_F64 = 12,
    FO_XLA_BF16 = 16
} fo_xla_dtype;

/* -- operands ----------------------------------------------------------------------- */

/* a dense array in XLA's default (row-major) layout; an empty one may have data NULL */
typedef struct {
    size_t struct_size;
    fo_xla_extension_base *extension_start;
    fo_xla_dtype dtype;
    void *data;
    int64_t rank;
    int64_t *dims; /* rank of them */
} fo_xla_buffer;

typedef enum { FO_XLA_ARG_BUFFER = 1 } fo_xla_arg_type;
typedef enum { FO_XLA_RET_BUFFER = 1 } fo_xla_ret_type;
typedef enum { FO_XLA_ATTR_SCALAR = 3, FO_XLA_ATTR_STRING = 4 } fo_xla_attr_type;

/* a string attribute: not NUL-terminated */
typedef struct {
    const char *ptr;
    size_t len;
} fo_xla_bytespan;

/* a scalar attribute: `value` points to one element of `dtype` */
typedef struct {
    fo_xla_dtype dtype;
    void *value;
} fo_xla_scalar;

typedef struct {
    size_t struct_size;
    fo_xla_extension_base *extension_start;
    int64_t size;
    fo_xla_arg_type *types;
    void **args; /* with types[i] FO_XLA_ARG_BUFFER: a fo_xla_buffer * */
} fo_xla_args;

typedef struct {
    size_t struct_size;
    fo_xla_extension_base *extension_start;
    int64_t size;
    fo_xla_ret_type *types;
    void **rets; /* with types[i] FO_XLA_RET_BUFFER: a fo_xla_buffer * */
} fo_xla_rets;

/* sorted by name; attrs[i] is a fo_xla_scalar * or fo_xla_bytespan * as types[i] says */
typedef struct {
    size_t struct_size;
    fo_xla_extension_base *extension_start;
    int64_t size;
    fo_xla_attr_type *types;
    fo_xla_bytespan **names;
    void **attrs;
} fo_xla_attrs;

/* -- the call frame ----------------------------------------------------------------- */

/* XLA may call a handler once per stage; compute belongs in EXECUTE, the others (when a
   handler registers for them) prepare state or resources that these handlers do not use */
typedef enum {
    FO_XLA_STAGE_INSTANTIATE = 0,
    FO_XLA_STAGE_PREPARE = 1,
    FO_XLA_STAGE_INITIALIZE = 2,
    FO_XLA_STAGE_EXECUTE = 3
} fo_xla_stage;

typedef struct fo_xla_execution_context fo_xla_execution_context; /* opaque, unused */

/* XLA_FFI_CallFrame, up to its attributes: the members XLA's struct_size counts (an
   asynchronous handler's output future follows; these handlers are synchronous and leave
   it as XLA set it, NULL) */
typedef struct {
    size_t struct_size;
    fo_xla_extension_base *extension_start;
    const fo_xla_api *api; /* NULL in the metadata call */
    fo_xla_execution_context *ctx;
    fo_xla_stage stage;
    fo_xla_args args;
    fo_xla_rets rets;
    fo_xla_attrs attrs;
} fo_xla_call_frame;

/* -- registration-time metadata ----------------------------------------------------- */

/* XLA_FFI_Metadata, up to its traits (what XLA's size counts; later members, such as a
   stateful handler's state type, are XLA's to fill) */
typedef struct {
    size_t struct_size;
    fo_xla_api_version api_version; /* out: the version the handler was written for */
    uint32_t traits;                /* out: XLA_FFI_Handler_Traits bits, 0 for none */
} fo_xla_metadata;

typedef struct {
    fo_xla_extension_base extension_base; /* type FO_XLA_EXTENSION_METADATA */
    fo_xla_metadata *metadata;
} fo_xla_metadata_extension;

#endif /* FASTOPT_XLA_FFI_H */
