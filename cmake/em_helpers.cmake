# Shared compile settings and the em_cc_library / em_cc_test helpers (STYLE.md: one library per
# core area, one gtest binary per area).

set(EM_WARNING_FLAGS -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers)
if(EM_WERROR)
  list(APPEND EM_WARNING_FLAGS -Werror)
endif()

if(EM_SANITIZE)
  add_compile_options(-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
  add_link_options(-fsanitize=address,undefined)
endif()

# em_target_defaults(target): warnings and include root for project code (not generated code).
function(em_target_defaults target)
  target_compile_options(${target} PRIVATE ${EM_WARNING_FLAGS})
  target_include_directories(${target} PUBLIC ${CMAKE_SOURCE_DIR})
endfunction()

# em_cc_library(NAME em_x SOURCES a.cc ... DEPS public-deps... PRIVATE_DEPS ...)
# A static library of one core area; it is also added to the `expertmesh_core` umbrella.
function(em_cc_library)
  cmake_parse_arguments(L "" "NAME" "SOURCES;DEPS;PRIVATE_DEPS" ${ARGN})
  add_library(${L_NAME} STATIC ${L_SOURCES})
  em_target_defaults(${L_NAME})
  target_link_libraries(${L_NAME} PUBLIC ${L_DEPS} PRIVATE ${L_PRIVATE_DEPS})
  target_compile_definitions(${L_NAME} PRIVATE EM_VERSION="${PROJECT_VERSION}")
  set_property(GLOBAL APPEND PROPERTY EM_CORE_LIBS ${L_NAME})
endfunction()

# em_cc_test(NAME name SOURCES a_test.cc ... [DEPS libs] [TIMEOUT s] [LABELS l])
# Tests labelled e2e are not defined at all when EM_BUILD_E2E_TESTS is off (guard any
# add_dependencies on them with `if(TARGET ...)`).
# Builds one gtest binary (linked to DEPS, default the whole core) and registers each test case
# with ctest. Tests find shared data and the build through the EM_* definitions. The main() is
# em_test_main (tests/testing/test_main.cc), not gtest_main: a skipped test fails.
function(em_cc_test)
  cmake_parse_arguments(T "" "NAME;TIMEOUT" "SOURCES;DEPS;LABELS" ${ARGN})
  if("e2e" IN_LIST T_LABELS AND NOT EM_BUILD_E2E_TESTS)
    return()
  endif()
  add_executable(${T_NAME} ${T_SOURCES})
  em_target_defaults(${T_NAME})
  if(NOT T_DEPS)
    set(T_DEPS expertmesh_core)
  endif()
  target_link_libraries(${T_NAME} PRIVATE ${T_DEPS} GTest::gtest GTest::gmock em_test_main)
  target_compile_definitions(${T_NAME} PRIVATE
    EM_SHARED_DIR="${EM_SHARED_DIR}"
    EM_SOURCE_DIR="${CMAKE_SOURCE_DIR}"
    EM_BINARY_DIR="${CMAKE_BINARY_DIR}"
    EM_DEPS_DIR="${EM_DEPS_DIR}")
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 900)
  endif()
  gtest_discover_tests(${T_NAME} DISCOVERY_MODE PRE_TEST
    PROPERTIES TIMEOUT ${T_TIMEOUT} LABELS "${T_LABELS}")
endfunction()
