// One DHSA attention op through the engine's C API (pydhsa_op_attention), driven by files: the x86 test
// (tests/test_arm_qemu.py) writes the inputs, runs this program built for aarch64 under qemu-user, and
// compares what it writes with the NumPy reference. Python itself does not run under qemu, so this is the
// whole of the ARM side.
//
//   op_driver REQUEST RESPONSE
//
// REQUEST (little-endian, as both x86-64 and aarch64 are): int32 magic 0x44485341, int32 sizeof the
// pydhsa_dhsa_params bytes that follow (the layout is the same on both LP64 targets; the size is checked),
// the params, int32 mode, n_q, n_kv, n_head, n_head_kv, d, q_pos0, dense_from, kv_type, n_threads,
// float scale, softcap, int64 n_range_ints, int64 k_bytes, v_bytes, then q (n_q * n_head * d f32) and the
// K and V caches as ggml stores kv_type (a ggml_type id: f32, f16, bf16, q8_0 rows).
// RESPONSE: int32 status, char[256] message, int64 n_ranges, then out (n_q * n_head * d f32) and the
// selection (n_ranges int32).
#include "pydhsa.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void * read_exact(FILE * f, size_t n) {
    void * p = malloc(n ? n : 1);
    if (p == NULL || fread(p, 1, n, f) != n) {
        fprintf(stderr, "op_driver: short request\n");
        exit(2);
    }
    return p;
}

int main(int argc, char ** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: op_driver REQUEST RESPONSE\n");
        return 2;
    }
    FILE * in = fopen(argv[1], "rb");
    if (in == NULL) {
        perror(argv[1]);
        return 2;
    }
    int32_t head[2];
    if (fread(head, sizeof(int32_t), 2, in) != 2 || head[0] != 0x44485341 ||
        head[1] != (int32_t) sizeof(pydhsa_dhsa_params)) {
        fprintf(stderr, "op_driver: bad request header (params size %d here)\n", (int) sizeof(pydhsa_dhsa_params));
        return 2;
    }
    pydhsa_dhsa_params params;
    void * raw = read_exact(in, sizeof(params));
    memcpy(&params, raw, sizeof(params));
    free(raw);
    int32_t * v = read_exact(in, 10 * sizeof(int32_t));
    const int32_t mode = v[0], n_q = v[1], n_kv = v[2], n_head = v[3], n_head_kv = v[4], d = v[5];
    const int32_t q_pos0 = v[6], dense_from = v[7], kv_type = v[8], n_threads = v[9];
    free(v);
    float sc[2];
    int64_t sizes[3];  // n_range_ints, k_bytes, v_bytes
    if (fread(sc, sizeof(float), 2, in) != 2 || fread(sizes, sizeof(int64_t), 3, in) != 3) {
        fprintf(stderr, "op_driver: short request\n");
        return 2;
    }
    const int64_t n_range_ints = sizes[0];
    float * q = read_exact(in, sizeof(float) * (size_t) n_q * n_head * d);
    void * k  = read_exact(in, (size_t) sizes[1]);
    void * vv = read_exact(in, (size_t) sizes[2]);
    fclose(in);

    float * out      = calloc((size_t) n_q * n_head * d, sizeof(float));
    int32_t * ranges = calloc((size_t) (n_range_ints > 0 ? n_range_ints : 1), sizeof(int32_t));
    int64_t n_ranges = 0;
    double elapsed   = 0.0;
    pydhsa_error err;
    memset(&err, 0, sizeof(err));
    const int32_t status = pydhsa_op_attention(mode, &params, dense_from, q, k, vv, kv_type, n_q, n_kv, n_head,
                                               n_head_kv, d, q_pos0, sc[0], sc[1], "cpu", n_threads, 1, false, out,
                                               ranges, n_range_ints, &n_ranges, &elapsed, &err);
    FILE * res = fopen(argv[2], "wb");
    if (res == NULL) {
        perror(argv[2]);
        return 2;
    }
    char message[256];
    memset(message, 0, sizeof(message));
    memcpy(message, err.message, sizeof(message) - 1);
    fwrite(&status, sizeof(status), 1, res);
    fwrite(message, 1, sizeof(message), res);
    fwrite(&n_ranges, sizeof(n_ranges), 1, res);
    fwrite(out, sizeof(float), (size_t) n_q * n_head * d, res);
    fwrite(ranges, sizeof(int32_t), (size_t) (n_ranges > 0 ? n_ranges : 0), res);
    fclose(res);
    free(q);
    free(k);
    free(vv);
    free(out);
    free(ranges);
    return status == 0 ? 0 : 1;
}
