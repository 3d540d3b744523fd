"""Running a job: the Ray-free job record (resume, bookkeeping) and the Ray driver that schedules the stages."""
