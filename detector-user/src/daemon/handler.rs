//! The daemon behind the one request handler (`control::handler`): the enforcer plus what only the daemon
//! holds (the fingerprint table, the model, the config file).

use super::*;

impl DaemonState {
    pub(super) fn fp_set(&mut self, args: FpSetArgs) -> Result<FpSetView, ControlError> {
        let target = parse_fp(&args.fp, |t| self.live.known_syn(t)).map_err(ControlError::bad_request)?;
        let known_keys = self.known_keys(&target);
        let action = args.action;
        let verdict = self.enforcer.fp_set(&FpRequest {
            target: target.clone(),
            action,
            class: args.class,
            ttl: args.ttl,
            permanent: args.permanent,
            reason: args.reason,
            origin: Origin::Cli,
            known_keys,
            config_rule: None,
        })?;
        let in_kernel = match (&target, action) {
            (_, FpAction::Allow) => false,
            (FpTarget::Syn { .. }, _) => true,
            _ => !verdict.hello_keys.is_empty(),
        };
        let note = (matches!(target, FpTarget::Ja4 { .. }) && !in_kernel && action != FpAction::Allow).then(|| {
            "no kernel ClientHello key is known for this JA4 yet: it is installed in the kernel when the first such \
             ClientHello is seen (until then the daemon acts per flow); give the JA4_r to install it now"
                .to_string()
        });
        Ok(FpSetView {
            id: verdict.id.clone(),
            action,
            ttl_secs: (verdict.expires_ns != 0)
                .then(|| clock::remaining(verdict.expires_ns).map_or(0, |d| d.as_secs())),
            kernel_keys: verdict
                .hello_keys
                .iter()
                .map(|k| format!("hello:{k:#018x}"))
                .collect(),
            in_kernel,
            note,
        })
    }

    pub(super) fn fp_remove(&mut self, fp: &str) -> Result<FpRemovedView, ControlError> {
        let target = parse_fp(fp, |t| self.live.known_syn(t)).map_err(ControlError::bad_request)?;
        let id = target.id();
        match self.enforcer.fp_remove(&id, Origin::Cli)? {
            Some(old) => Ok(FpRemovedView {
                id,
                removed: true,
                action: old.action,
            }),
            None => Err(ControlError::new(
                ErrorKind::NotFound,
                format!("{fp} has no verdict"),
            )),
        }
    }
}

/// The daemon behind the one request handler: the enforcer plus the fingerprint table, the model and the config.
impl Backend for DaemonState {
    fn enforcer(&mut self) -> &mut Enforcer {
        &mut self.enforcer
    }

    fn status(&mut self) -> Result<StatusView, ControlError> {
        DaemonState::status(self)
    }

    fn fp_list(&mut self) -> Result<Vec<FpRow>, ControlError> {
        Ok(DaemonState::fp_list(self))
    }

    fn fp_set(&mut self, args: FpSetArgs) -> Result<FpSetView, ControlError> {
        DaemonState::fp_set(self, args)
    }

    fn fp_remove(&mut self, fp: &str) -> Result<FpRemovedView, ControlError> {
        DaemonState::fp_remove(self, fp)
    }

    fn score_top(&mut self, kind: crate::model::Kind, limit: usize) -> Result<ScoreTopView, ControlError> {
        Ok(DaemonState::score_top(self, kind, limit))
    }

    fn explain(&mut self, target: &ExplainTarget) -> Result<ExplainView, ControlError> {
        DaemonState::explain(self, target)
    }

    fn reload(&mut self) -> Result<(), ControlError> {
        DaemonState::reload(self)
            .map_err(|e| ControlError::bad_request(format!("reload rejected, running config kept: {e:#}")))
    }
}

impl Handler for DaemonState {
    fn handle(&mut self, request: Request) -> Result<Response, ControlError> {
        control::handler::handle(self, request)
    }
}
