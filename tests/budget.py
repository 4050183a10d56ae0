"""The fast suite's time budget: what runs only in the slow sweep, in one place.

The README's test command (``python -m pytest -q -n auto``) is the suite a contributor runs
before every change: at most 5 minutes on 2 cores from a fresh clone. It is bound by XLA
compilation (one compile per method, configuration, dtype and shape), so its cost is the number
of distinct programs it builds. Besides the ``slow`` marks written on the tests themselves
(sweeps over every method, matrix or size), the tests below run only in the slow sweep
(``python -m pytest -q -n auto -m slow tests``, run whole by ``.ci/run``):

- :data:`SLOW_TESTS`: a test of its own whose programs take 6 seconds or more to compile and
  whose code path a cheaper default test also runs (the sizes, batch shapes, models and
  sequences that it adds are checked in the slow sweep);
- :data:`ONE_CASE`: a parametrised test whose first case (in collection order, not already
  slow) runs by default and its other cases in the slow sweep: they repeat the first case's
  code path with another dtype, method variant, size or reference.

``conftest.py`` applies both at collection time. To rebalance, measure the default suite with
``python -m pytest -q -n auto --durations=0`` and move tests by their cost.
"""

SLOW_TESTS = frozenset(
    {
        "test_cagrad_solver.py::test_degenerate_faces_match_torchjd",
        "test_cagrad_solver.py::test_float32_loop_stops_when_rounding_leaves_no_progress",
        "test_cagrad_solver.py::test_vmapped_solve_equals_the_loop_over_gramians",
        "test_demo.py::test_demo_trains_both_methods",
        "test_engines.py::test_equinox_module_with_the_filter_pattern",
        "test_engines.py::test_flax_nnx_state_through_the_engines",
        "test_engines.py::test_gramian_engines_float32",
        "test_engines.py::test_layerwise_structure_ghost_and_rows",
        "test_engines.py::test_mtl_layerwise_equals_the_materialised_jacobian",
        "test_engines.py::test_per_sample_engine_does_not_read_a_constant_of_batch_length_as_samples",
        "test_engines.py::test_per_sample_engine_keeps_equinox_linear_layers_on_the_fast_path",
        "test_engines.py::test_per_sample_engine_reads_equinox_and_flax_convolutions_and_embeddings",
        "test_engines.py::test_random_weighting_reads_the_key",
        "test_hardening.py::test_cagrad_float32_passes_torchjds_non_conflict_check",
        "test_hardening.py::test_matrices_that_are_no_gramian_give_nan_and_not_converged",
        "test_hardening.py::test_mgda_exact_does_not_conflict_on_ill_conditioned_rows",
        "test_hardening.py::test_nash_mtl_and_pcd_keep_their_state_at_the_true_scale",
        "test_hardening.py::test_nash_mtl_under_vmap_equals_each_lane_on_ill_scaled_float32_rows",
        "test_hardening.py::test_nash_mtl_vmap_equals_each_lane_in_float64",
        "test_hardening.py::test_norm_eps_is_relative_by_default_and_torchjds_rule_on_request",
        "test_hardening.py::test_scale_invariant_methods_survive_gramian_overflow_and_underflow",
        "test_libmtl.py::test_cagrad_rescale_matches_libmtl",
        "test_libmtl.py::test_loss_normalisers_under_vmap_equal_the_loop",
        "test_libmtl.py::test_losses_are_read_only_where_needed",
        "test_libmtl.py::test_tracking_aggregators_policy",
        "test_methods.py::test_cagrad_goldens_validation_and_non_conflict",
        "test_methods.py::test_goldens_of_torchjd_readme",
        "test_optax.py::test_monitor_keeps_this_steps_conflict_statistics",
        "test_optax.py::test_state_round_trips_through_host_memory",
        "test_qpax_crossover.py::test_crossover_matches_default_on_every_family",
        "test_reference.py::test_cagrad_matches_cvxpy_or_finds_a_better_optimum",
        "test_relative_norm_eps.py::test_the_fallback_is_at_tiny_over_eps",
        "test_relative_norm_eps.py::test_torchjds_rule_is_norm_eps_1e_4",
        "test_scalarization.py::test_stateful_scalarizers_vmap_over_runs_and_round_trip",
        "test_scalarization.py::test_uw_trains_inside_a_params_pytree",
        "test_sharding.py::test_sharded_upgrad_all_reduces_only_the_gramian",
        "test_solver_objects.py::test_kkt_residual_is_scale_invariant_and_pgd_stops_truthfully",
        "test_solver_objects.py::test_tiny_rows_are_not_drowned_by_the_ridge",
        "test_solver_vmap.py::test_bpp_with_unrolled_solves_equals_lapack",
        "test_solver_vmap.py::test_float32_vmaps_keep_the_wide_residual",
        "test_solver_vmap.py::test_large_vmapped_batch_finishes_on_the_cpu",
        "test_solver_vmap.py::test_vmap_of_vmap_of_the_projection",
        "test_solver_vmap.py::test_vmap_over_right_hand_sides_with_one_gramian",
        "test_solver_vmap.py::test_vmapped_projection_equals_the_loop",
        "test_solver_vmap.py::test_vmapped_weighting_traces_every_product_at_full_precision",
        "test_solvers.py::test_admm_guess_leaves_few_lanes_to_pivot",
        "test_solvers.py::test_batched_rhs_any_leading_shape",
        "test_solvers.py::test_bpp_kkt_float64",
        "test_solvers.py::test_float32_refinement_reuses_the_lanes_factors",
        "test_solvers.py::test_half_size_path_is_refined_to_rounding",
        "test_solvers.py::test_half_size_primal_dual_path_equals_full_size",
        "test_solvers.py::test_huge_gramian_has_no_failure",
        "test_solvers.py::test_lane_compaction_matches_solving_each_lane_alone",
        "test_solvers.py::test_lanes_factorised_in_chunks_give_the_same_answers",
        "test_solvers.py::test_pgd_agrees_with_bpp",
        "test_solvers.py::test_qpax_agrees_with_bpp_within_its_accuracy",
        "test_solvers.py::test_refinement_step_under_vmap_runs_only_where_needed",
        "test_stateful.py::test_five_step_sequences",
        "test_stateful.py::test_jd_aggregate_carries_the_state",
        "test_stateful.py::test_nash_mtl_float32_newton_steps_stay_finite",
        "test_stateful.py::test_nash_mtl_where_ecos_is_inaccurate",
        "test_stateful.py::test_nash_mtl_where_torchjd_raises",
        "test_stateful.py::test_pcd_satisfies_its_kkt_conditions",
        "test_stateful.py::test_vmap_over_batches_of_jacobians_and_states",
        "test_transformations.py::test_solver_info_is_readable",
    }
)

ONE_CASE = frozenset(
    {
        "test_engines.py::test_gramian_engines_equal_jacrev",
        "test_engines.py::test_weighted_grad_equals_aggregating_the_jacobian",
        "test_errors.py::test_zero_jacobian_gives_zero_update",
        "test_hardening.py::test_config_undefined_direction_gives_zero",
        "test_hardening.py::test_fairgrad_weights_are_homogeneous_of_their_declared_degree",
        "test_hardening.py::test_float32_gives_float64s_answer_or_nan_at_every_scale",
        "test_hardening.py::test_mgda_exact_is_the_minimum_norm_point",
        "test_hardening.py::test_scale_invariant_claim_holds",
        "test_libmtl.py::test_mgda_normalizers_match_libmtl",
        "test_libmtl.py::test_norm_normalizers_are_not_scale_invariant_but_overflow_safe",
        "test_libmtl.py::test_stateful_libmtl_methods_match_libmtl",
        "test_methods.py::test_fairgrad_solves_its_equation_and_is_non_conflicting",
        "test_methods.py::test_pcgrad_equals_upgrad_with_ones_preference_for_two_objectives",
        "test_mgda_promise.py::test_default_does_not_conflict_where_frank_wolfe_did",
        "test_optax.py::test_compositions_run_two_jitted_steps",
        "test_policy_properties.py::test_non_conflicting_methods_never_conflict",
        "test_policy_properties.py::test_value_policy_holds_on_random_ill_scaled_inputs",
        "test_properties.py::test_config_float32_permutation_invariant_on_ill_conditioned_rows",
        "test_properties.py::test_finite_output_of_right_shape",
        "test_properties.py::test_strongly_stationary_only_at_zero",
        "test_qpax_crossover.py::test_upgrad_gaussian_matches_default",
        "test_reference.py::test_crmogm_five_step_sequences",
        "test_reference.py::test_fairgrad_matches_or_beats_torchjd",
        "test_reference.py::test_stateful_weightings_five_step_sequences",
        "test_scalarization.py::test_matches_torchjd_in_float32",
        "test_scalarization.py::test_scalarizer_transformations",
        "test_shapes.py::test_degenerate_shapes_work_or_are_refused_by_name",
        "test_shapes.py::test_one_row_gives_that_row",
        "test_solver_vmap.py::test_unrolled_spd_solve_matches_lapack",
        "test_solvers.py::test_bpp_float32_accuracy",
        "test_stateful.py::test_excess_mtl_matches_torchjd",
        "test_stateful.py::test_gradvac_sequences_properties",
        "test_stateful.py::test_gramian_weightings_match_torchjd",
        "test_stateful.py::test_nash_mtl_matches_cvxpy",
        "test_tiny_gramians.py::test_float32_gives_float64s_weights_or_nan",
        "test_tiny_gramians.py::test_power_of_two_scaling_is_exact",
        "test_transformations.py::test_grad_treats_weights_as_constants",
        "test_transformations.py::test_protocol_spellings_agree",
        "test_transformations.py::test_weighting_vmapped_over_gramians",
        "test_wrt.py::test_value_and_weighted_grad_with_wrt",
    }
)
