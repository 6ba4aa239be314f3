//! Job states, numbered as CIM's `ConcreteJob.JobState` (what Hyper-V scripts switch on).

use std::fmt;

/// A job's state. The numbers are CIM's and never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    New = 2,
    Starting = 3,
    Running = 4,
    Suspended = 5,
    ShuttingDown = 6,
    Completed = 7,
    Terminated = 8,
    Killed = 9,
    Exception = 10,
}

impl JobState {
    pub const ALL: [JobState; 9] = [
        JobState::New,
        JobState::Starting,
        JobState::Running,
        JobState::Suspended,
        JobState::ShuttingDown,
        JobState::Completed,
        JobState::Terminated,
        JobState::Killed,
        JobState::Exception,
    ];

    /// CIM's number for this state.
    pub fn number(self) -> u16 {
        self as u16
    }

    /// CIM's name for this state.
    pub fn name(self) -> &'static str {
        match self {
            JobState::New => "New",
            JobState::Starting => "Starting",
            JobState::Running => "Running",
            JobState::Suspended => "Suspended",
            JobState::ShuttingDown => "ShuttingDown",
            JobState::Completed => "Completed",
            JobState::Terminated => "Terminated",
            JobState::Killed => "Killed",
            JobState::Exception => "Exception",
        }
    }

    /// The state whose CIM number is `n`, if there is one.
    pub fn from_number(n: u16) -> Option<JobState> {
        JobState::ALL.into_iter().find(|s| s.number() == n)
    }

    /// Whether the job has ended (Completed, Terminated, Killed or Exception).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Terminated | JobState::Killed | JobState::Exception
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_carry_cim_numbers_and_names() {
        let table: Vec<(u16, &str)> = JobState::ALL
            .iter()
            .map(|s| (s.number(), s.name()))
            .collect();
        assert_eq!(
            table,
            vec![
                (2, "New"),
                (3, "Starting"),
                (4, "Running"),
                (5, "Suspended"),
                (6, "ShuttingDown"),
                (7, "Completed"),
                (8, "Terminated"),
                (9, "Killed"),
                (10, "Exception"),
            ]
        );
        assert_eq!(JobState::from_number(7), Some(JobState::Completed));
        assert_eq!(JobState::from_number(11), None);
    }

    #[test]
    fn only_end_states_count_as_finished() {
        let finished: Vec<_> = JobState::ALL
            .into_iter()
            .filter(|s| s.is_finished())
            .collect();
        assert_eq!(
            finished,
            vec![
                JobState::Completed,
                JobState::Terminated,
                JobState::Killed,
                JobState::Exception
            ]
        );
    }
}
