#pragma once
// Checks of a GGUF's hyperparameters that llama.cpp would meet with an assertion (a process abort).

#include <string>

// A one-line description of the first hyperparameter of `path` that would make llama.cpp abort, or "" when
// there is none (a file that is not readable as GGUF also gives "": llama.cpp's loader reports it).
std::string pydhsa_hparams_problem(const char * path);
