from perf_pipeline_tests.benchmarks.scale import main

main()
