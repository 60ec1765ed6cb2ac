"""`python -m moce_model.rehearsal DIR`: build the paper-rehearsal fixtures."""

from moce_model.rehearsal.fixtures import main

main()
