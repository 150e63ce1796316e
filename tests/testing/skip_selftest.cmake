# cmake -DPROBE=<em_skip_probe> -DWORK=<scratch dir> -DCHECK=<check_ctest_summary.sh>
#       -P skip_selftest.cmake
# Proves that a skipped test fails: em_test_main's exit status for each way a test gets skipped,
# ctest's verdict on them with the SKIP_REGULAR_EXPRESSION that gtest_discover_tests sets, and
# check_ctest_summary.sh's verdict on a ctest run where a test did not run.
cmake_minimum_required(VERSION 3.25)

function(run_probe want_rc expect_text)
  execute_process(COMMAND "${PROBE}" ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out
                  ERROR_VARIABLE err)
  set(all "${out}${err}")
  if(want_rc STREQUAL "fail")
    if(rc EQUAL 0)
      message(FATAL_ERROR "probe ${ARGN}: exit status 0, expected a failure\n${all}")
    endif()
  elseif(NOT rc EQUAL want_rc)
    message(FATAL_ERROR "probe ${ARGN}: exit status ${rc}, expected ${want_rc}\n${all}")
  endif()
  if(expect_text AND NOT all MATCHES "${expect_text}")
    message(FATAL_ERROR "probe ${ARGN}: output lacks '${expect_text}'\n${all}")
  endif()
  if(all MATCHES "\\[  SKIPPED \\]")
    message(FATAL_ERROR "probe ${ARGN}: printed a [  SKIPPED ] line, which ctest would take for "
                        "a skip\n${all}")
  endif()
  message(STATUS "probe ${ARGN}: exit status ${rc} as expected")
endfunction()

run_probe(0 "" --gtest_filter=Probe.Passes)
run_probe(0 "Probe\\.[^a-zA-Z]*Passes[^a-zA-Z]*Skips" --gtest_list_tests)
run_probe(fail "golden data not found" --gtest_filter=Probe.Skips)
run_probe(fail "could not load the suite's data" --gtest_filter=SetUpTestSuiteFails.*)
run_probe(fail "skipped in SetUp" --gtest_filter=SkipsInSetUp.Body)
run_probe(fail "selected no test" --gtest_filter=Probe.NoSuchTest)
run_probe(fail "a skipped test is a failed test")

# ctest, with the properties gtest_discover_tests gives each test: a skip must be a failure.
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")
file(WRITE "${WORK}/CTestTestfile.cmake" "")
foreach(t Probe.Passes Probe.Skips SetUpTestSuiteFails.NeedsTheData SkipsInSetUp.Body)
  file(APPEND "${WORK}/CTestTestfile.cmake"
       "add_test([==[${t}]==] [==[${PROBE}]==] [==[--gtest_filter=${t}]==])\n"
       "set_tests_properties([==[${t}]==] PROPERTIES SKIP_REGULAR_EXPRESSION [==[\\[  SKIPPED \\]]==])\n")
endforeach()
execute_process(COMMAND "${CMAKE_CTEST_COMMAND}" --test-dir "${WORK}" RESULT_VARIABLE rc
                OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0)
  message(FATAL_ERROR "ctest passed a run with skipped tests\n${out}${err}")
endif()
foreach(t Probe.Skips SetUpTestSuiteFails.NeedsTheData SkipsInSetUp.Body)
  if(NOT out MATCHES "- ${t} \\(Failed\\)")
    message(FATAL_ERROR "ctest did not report ${t} as failed\n${out}${err}")
  endif()
endforeach()
if(out MATCHES "Probe\\.Passes \\(Failed\\)" OR out MATCHES "did not run")
  message(FATAL_ERROR "ctest: unexpected verdicts\n${out}${err}")
endif()
message(STATUS "ctest failed the skipped tests, passed Probe.Passes")

# The CI script's summary check: a test that ctest did not run (here: disabled) fails the run
# although ctest's exit status is 0.
file(WRITE "${WORK}/CTestTestfile.cmake"
     "add_test(passes [==[${PROBE}]==] --gtest_filter=Probe.Passes)\n"
     "add_test(disabled [==[${PROBE}]==] --gtest_filter=Probe.Passes)\n"
     "set_tests_properties(disabled PROPERTIES DISABLED TRUE)\n")
execute_process(COMMAND "${CMAKE_CTEST_COMMAND}" --test-dir "${WORK}" RESULT_VARIABLE rc
                OUTPUT_FILE "${WORK}/ctest.log" ERROR_VARIABLE err)
execute_process(COMMAND bash "${CHECK}" "${WORK}/ctest.log" RESULT_VARIABLE check_rc
                OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(check_rc EQUAL 0)
  file(READ "${WORK}/ctest.log" log)
  message(FATAL_ERROR "check_ctest_summary.sh passed a run with a disabled test\n${log}")
endif()
file(WRITE "${WORK}/CTestTestfile.cmake"
     "add_test(passes [==[${PROBE}]==] --gtest_filter=Probe.Passes)\n")
execute_process(COMMAND "${CMAKE_CTEST_COMMAND}" --test-dir "${WORK}" RESULT_VARIABLE rc
                OUTPUT_FILE "${WORK}/ctest.log" ERROR_VARIABLE err)
execute_process(COMMAND bash "${CHECK}" "${WORK}/ctest.log" RESULT_VARIABLE check_rc
                OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0 OR NOT check_rc EQUAL 0)
  message(FATAL_ERROR "a clean run failed: ctest ${rc}, check ${check_rc}\n${out}${err}")
endif()
message(STATUS "check_ctest_summary.sh failed the run with a disabled test, passed a clean run")
file(REMOVE_RECURSE "${WORK}")
