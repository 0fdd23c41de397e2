"""DE ELBO: the data-emphasized ELBO, which learns the L2-SP strengths during the one run that trains
the model. `objective` holds the equations, `posterior` q(w) = N(m, σ²I), `callback` the learned
λ, τ, ρ, `arguments` and `trainer` the Trainer interface, `prediction` the posterior mean and
Bayesian model average, `config` the `config.deelbo` entry."""
