"""Running a home: backup and restore, the offline bundle, doctor, evaluation, logs."""
