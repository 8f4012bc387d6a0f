# Locate the pinned upstream llama.cpp tree and make the fork's patched copy of it.
#
# Inputs (either one makes the build work offline):
#   PYDHSA_LLAMA_CPP_DIR     CMake option or environment variable: an already unpacked llama.cpp tree
#   PYDHSA_UPSTREAM_SDIST    environment variable: the llama-cpp-python sdist file, already downloaded
# Otherwise native/fetch_upstream.py downloads the pinned sdist once into the user cache.
# Output: PYDHSA_PATCHED_TREE, the patched copy that the build compiles.

find_package(Python3 REQUIRED COMPONENTS Interpreter)

set(PYDHSA_LLAMA_CPP_DIR "$ENV{PYDHSA_LLAMA_CPP_DIR}" CACHE PATH
    "Already unpacked upstream llama.cpp tree (offline build); empty = fetch the pinned sdist")
set(PYDHSA_CACHE_DIR "$ENV{PYDHSA_CACHE_DIR}" CACHE PATH
    "Where the upstream sdist and patched trees are kept between builds; empty = ~/.cache/pydhsa")
if(NOT PYDHSA_CACHE_DIR)
    if(DEFINED ENV{XDG_CACHE_HOME} AND NOT "$ENV{XDG_CACHE_HOME}" STREQUAL "")
        set(PYDHSA_CACHE_DIR "$ENV{XDG_CACHE_HOME}/pydhsa")
    else()
        set(PYDHSA_CACHE_DIR "$ENV{HOME}/.cache/pydhsa")
    endif()
endif()

function(pydhsa_run_script out_var)
    execute_process(
        COMMAND ${Python3_EXECUTABLE} ${ARGN}
        OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc
        OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(err)
        message(STATUS "${err}")
    endif()
    if(NOT rc EQUAL 0)
        message(FATAL_ERROR "pydhsa: ${ARGV1} failed:\n${err}")
    endif()
    string(REGEX REPLACE ".*\n" "" last_line "${out}")
    set(${out_var} "${last_line}" PARENT_SCOPE)
endfunction()

if(PYDHSA_LLAMA_CPP_DIR)
    if(NOT EXISTS "${PYDHSA_LLAMA_CPP_DIR}/ggml/CMakeLists.txt")
        message(FATAL_ERROR "PYDHSA_LLAMA_CPP_DIR=${PYDHSA_LLAMA_CPP_DIR} is not a llama.cpp tree")
    endif()
    set(pristine "${PYDHSA_LLAMA_CPP_DIR}")
else()
    pydhsa_run_script(pristine ${CMAKE_CURRENT_LIST_DIR}/../fetch_upstream.py --cache-dir ${PYDHSA_CACHE_DIR})
endif()
message(STATUS "pydhsa: upstream llama.cpp tree: ${pristine}")

pydhsa_run_script(PYDHSA_PATCHED_TREE ${CMAKE_CURRENT_LIST_DIR}/../apply_patches.py
    ${pristine} ${CMAKE_CURRENT_LIST_DIR}/../patches ${PYDHSA_CACHE_DIR}/patched)
message(STATUS "pydhsa: patched tree: ${PYDHSA_PATCHED_TREE}")

# Re-run CMake when the patch series changes, so an edited patch can never be silently skipped.
file(GLOB pydhsa_patches ${CMAKE_CURRENT_LIST_DIR}/../patches/*.patch)
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${pydhsa_patches})
