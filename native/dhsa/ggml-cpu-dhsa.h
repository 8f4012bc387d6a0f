// CPU forward functions of the DHSA ops, called from ggml-cpu's dispatch (see native/patches/).
#pragma once

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_compute_params;
struct ggml_tensor;

void ggml_compute_forward_dhsa_select(const struct ggml_compute_params * params, struct ggml_tensor * dst);
void ggml_compute_forward_dhsa_attn(const struct ggml_compute_params * params, struct ggml_tensor * dst);

// Bytes of work buffer the op needs with n_tasks threads (ggml_graph_plan adds it up).
size_t ggml_cpu_dhsa_work_size(const struct ggml_tensor * node, int n_tasks);

struct dhsa_runtime;

// Frees what the CPU kernel cached in rt (per-segment boundaries and representations).
__attribute__((visibility("default"))) void ggml_dhsa_runtime_release_cache(struct dhsa_runtime * rt);

#ifdef __cplusplus
}
#endif
